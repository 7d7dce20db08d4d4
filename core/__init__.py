"""effinfer.core"""
