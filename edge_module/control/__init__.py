"""Operating the running module from outside: live settings, direct methods, reported state.

Transport-neutral: the edgeHub transport feeds the module twin and direct
methods in here; ``app.py`` applies what these decide.
"""
