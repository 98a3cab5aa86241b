"""``edge-module run``: validate the settings, then start the module (or replicas,
or fetch a licence with ``DownloadLicense=True``). Runs on the main thread."""

from __future__ import annotations

from pathlib import Path

from edge_module import logs
from edge_module.cli.common import EXIT_CONFIG, fail
from edge_module.config import Settings, load_settings
from edge_module.exceptions import ModelError


def run_command(assignments: list[str], config_file: Path | None) -> int:
    settings = load_settings(assignments, config_file=config_file)
    logs.register_secrets(settings.secrets())
    logs.configure(settings.log.level, settings.log.format)
    from edge_module.app import App  # heavy imports (onnxruntime, cv2) after validation
    from edge_module.licensing.license_file import LicenseError
    from edge_module.trust.keys import keys_for

    keys_for(settings)  # a release build refuses development switches in every command
    if settings.download_license:
        return _download_license(settings)
    if settings.replicas > 1:
        from edge_module.replicas import supervise

        return supervise(settings, assignments, config_file)
    try:
        app = App(settings)
    except LicenseError as exc:
        fail(f"licence error: {exc}")
        return EXIT_CONFIG
    except ModelError as exc:
        text = str(exc)
        fail(f"model error: {text}" if "fix:" in text else
             f"model error: {text}; fix: check Model:Name / Model:Path")
        return EXIT_CONFIG
    return app.run()


def _download_license(settings: Settings) -> int:
    """DownloadLicense=True: fetch the signed licence into Mounts:License and exit."""
    import base64

    from edge_module.billing_api import BillingClient
    from edge_module.identity import installation_identity
    from edge_module.licensing.license_file import LicenseError, download_license
    from edge_module.state import ensure_data_dir, module_signing_key
    from edge_module.trust.signing import raw_public

    data = ensure_data_dir(settings.data.path)
    identity = installation_identity(data)
    module_key = base64.b64encode(raw_public(module_signing_key(data).public_key())).decode()
    client = BillingClient.from_settings(settings, timeout=30)
    assert settings.mounts.license is not None
    try:
        path = download_license(client, identity, module_key, settings.mounts.license)
    except LicenseError as exc:
        fail(f"licence error: {exc}")
        return 1
    print(f"licence written to {path}; run disconnected with Mounts:License="
          f"{settings.mounts.license} Mounts:Output=<folder> and the same Data:Path")
    return 0


