"""The errors every layer raises; the ground floor of the package, it imports nothing.

`ConfigError` is a config or command line that cannot be used; `videomamba` prints it and exits 2. Its message names
the key (or option) and where it came from. `pipeline.config.ConfigError` is the same class.
"""


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and where it came from."""
