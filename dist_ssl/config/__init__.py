"""Typed configs: dataclass defaults -> recipe YAML -> `dotted.key=value` overrides."""
from dist_ssl.config.errors import ConfigError
from dist_ssl.config.registry import register_section, register_variant
from dist_ssl.config.run import config_to_yaml, load_config, save_config
from dist_ssl.config.schema import doc, from_dict, to_dict

__all__ = ["ConfigError", "config_to_yaml", "doc", "from_dict", "load_config",
           "register_section", "register_variant", "save_config", "to_dict"]
