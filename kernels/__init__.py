"""effinfer.kernels"""
