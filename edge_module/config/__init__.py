"""Settings: declared once (``settings.py``), read from three sources and translated
into one-line errors (``sources.py``), documented (``reference.py``).

Everything the rest of the package needs is importable from here.
"""

from edge_module.config.reference import reference_markdown
from edge_module.config.settings import (
    BUILTIN_MODELS,
    BillingSettings,
    DataSettings,
    EdgeHubSettings,
    GrpcSettings,
    HttpSettings,
    HttpTlsSettings,
    LicensingSettings,
    LogSettings,
    MeteringSettings,
    ModelSettings,
    MountsSettings,
    MqttSettings,
    MqttTlsSettings,
    PipelineSettings,
    Section,
    SettingError,
    Settings,
    builtin_models,
    descriptor_path,
    subscription_filter,
)
from edge_module.config.sources import (
    all_keys,
    load_settings,
    parse_assignments,
    resolve_key,
    set_path,
    translate,
)

__all__ = [
    "BUILTIN_MODELS", "BillingSettings", "DataSettings", "EdgeHubSettings", "GrpcSettings",
    "HttpSettings", "HttpTlsSettings",
    "LicensingSettings", "LogSettings", "MeteringSettings", "ModelSettings", "MountsSettings",
    "MqttSettings", "MqttTlsSettings", "PipelineSettings", "Section", "SettingError",
    "Settings", "all_keys", "builtin_models", "descriptor_path", "load_settings",
    "parse_assignments", "reference_markdown", "resolve_key", "set_path", "subscription_filter",
    "translate",
]
