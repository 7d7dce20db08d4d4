"""effinfer.plugins"""
