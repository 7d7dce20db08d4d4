"""effinfer.evaluation"""
