"""effinfer.taxonomy"""
