"""Every licence status the module can report, with its human message and remedy.

The first eight are the Azure AI containers statuses (returned by the billing
endpoint); the last three are about licence files (disconnected mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class LicenseFileStatus(StrEnum):
    NOT_FOUND = "LicenseNotFound"
    INVALID = "LicenseInvalid"
    EXPIRED = "LicenseExpired"


@dataclass(frozen=True)
class Explanation:
    message: str
    remedy: str


EXPLANATIONS: dict[str, Explanation] = {
    "Valid": Explanation("The ApiKey is valid for this container.", "Nothing to do."),
    "Invalid": Explanation(
        "The ApiKey is not valid.",
        "Pass the key of your resource with ApiKey=<key>; check for a typo or a rotated key."),
    "Mismatch": Explanation(
        "The ApiKey belongs to a different kind of resource than this container.",
        "Use the key of a resource created for this container type."),
    "CouldNotConnect": Explanation(
        "The billing endpoint could not be reached.",
        "Check the network path to Billing (DNS, firewall, proxy); run "
        "`edge-module diagnose` for each check and its fix."),
    "OutOfQuota": Explanation(
        "The quota of this key is used up.",
        "Raise the quota or wait for the period to renew; the module checks again after "
        "Retry-After."),
    "BillingEndpointBusy": Explanation(
        "The billing endpoint is busy.",
        "Nothing to do: the module retries after Retry-After."),
    "ContainerUseUnauthorized": Explanation(
        "The ApiKey may not run this container.",
        "Ask the vendor to authorise container use for your resource."),
    "Unknown": Explanation(
        "The billing endpoint gave an unexpected or unverifiable answer.",
        "Check that Billing points at the vendor's endpoint and that no proxy rewrites its "
        "answers; run `edge-module diagnose`; if it persists, contact the vendor."),
    LicenseFileStatus.NOT_FOUND: Explanation(
        "The provided license path was not found. Please ensure a volume is mounted and a "
        "directory exists at the location specified by Mounts:License",
        "Mount the folder holding the licence file and pass Mounts:License=<folder>; get "
        "the file once online with DownloadLicense=True."),
    LicenseFileStatus.INVALID: Explanation(
        "The licence file is not valid: its signature does not verify, it is malformed, or "
        "it was issued for another container type or installation.",
        "Download a fresh licence with DownloadLicense=True; do not edit the file."),
    LicenseFileStatus.EXPIRED: Explanation(
        "The licence file has expired.",
        "Download a new licence with DownloadLicense=True while online."),
}


def explain(status: str) -> Explanation:
    return EXPLANATIONS.get(status, EXPLANATIONS["Unknown"])
