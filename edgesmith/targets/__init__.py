"""Target device profiles (YAML data) and the memory-fit estimate."""
