"""Built-in SRDE plugins: every feature is one module, loaded through the `srde` entry-point group."""
