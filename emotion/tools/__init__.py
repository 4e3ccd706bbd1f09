"""Tools for analysts and tests: the command line, exports and evaluation, plots, a voice
turn client, and random-weight checkpoints."""
