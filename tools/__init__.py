"""Tools for readers and plugin authors: the docs site builder and the plugin scaffold.

This layer sits on top of everything else (the site reads the evaluator's results store).
"""
