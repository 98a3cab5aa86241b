"""The vendor's trust anchors: Ed25519 signing helpers and the keys this build trusts.

``signing`` signs and verifies canonical JSON; ``keys`` holds the trusted key
set (key id, public key, validity window) and finds the keys of this build
(``build.json`` inside the package: written at image build for a release
build, empty in a source checkout, which is a development build). Both
``licensing`` and ``metering`` import this package; it imports neither.
"""
