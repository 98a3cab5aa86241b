"""Bounded decoding without a broker: sizes come from headers, bombs are refused unallocated."""

from __future__ import annotations

import base64
import json
import resource
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pytest

from edge_module.config import ModelSettings
from edge_module.errors import ErrorCode
from edge_module.inference import bounds
from edge_module.inference.codecs import MAX_JSON_DEPTH, Codec, Limits, RequestError
from edge_module.inference.models import Model, load_model
from tests.hostile import (
    apng_with_frame,
    jpeg,
    jpeg_claiming,
    jpeg_scan_bomb,
    json_nested,
    json_tensor,
    npy,
    npy_lying,
    png_bomb,
    png_claiming,
    png_lying_small,
    png_with_chunk_bomb,
)

MB = 1024 * 1024


@pytest.fixture(scope="module")
def digits() -> Model:
    return load_model(ModelSettings())


@pytest.fixture(scope="module")
def codec(digits: Model) -> Codec:
    return Codec(digits, Limits(max_payload_bytes=4 * MB, max_batch_items=64))


def refused(codec: Codec, payload: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        codec.decode(payload)
    assert info.value.message
    return info.value


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_png_bomb_is_a_real_png_that_opencv_would_decode() -> None:
    # The test's bomb is honest: a small one built the same way decodes to its full size.
    image = cv2.imdecode(np.frombuffer(png_bomb(300, 200), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image is not None and image.shape == (200, 300) and not image.any()
    assert len(png_bomb(30000, 30000)) < 1 * MB


def test_header_dimensions_of_png_and_every_jpeg_flavour() -> None:
    assert bounds.image_dimensions(png_bomb(300, 200)) == (300, 200)
    assert bounds.image_dimensions(jpeg(40, 30)) == (40, 30)
    ok, progressive = cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8),
                                   [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and bounds.image_dimensions(bytes(progressive)) == (40, 30)
    assert bounds.image_dimensions(jpeg_claiming(65000, 65000)) == (65000, 65000)
    # An APP segment holding a fake SOF marker is skipped by its length, not parsed.
    data = jpeg(16, 8)
    fake = b"\xff\xe1" + (2 + 9).to_bytes(2, "big") + b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff"
    assert bounds.image_dimensions(data[:2] + fake + data[2:]) == (16, 8)
    for broken in (b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\x00\x00", b"\xff\xd8",
                   b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDX" + bytes(13)):
        with pytest.raises(bounds.MalformedHeader):
            bounds.image_dimensions(broken)


@pytest.mark.parametrize("make", [
    lambda: png_bomb(30000, 30000),
    lambda: png_claiming(65000, 65000),
    lambda: jpeg_claiming(30000, 30000),
    lambda: jpeg_claiming(65000, 65000),
    lambda: jpeg_claiming(6000, 6000),
], ids=["png-30000", "png-65000", "jpeg-30000", "jpeg-65000", "jpeg-6000"])
def test_image_bombs_are_refused_before_a_pixel_is_decoded(
    codec: Codec, make: Callable[[], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = cv2.imdecode

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cv2, "imdecode", counting)
    before = peak_rss_mb()
    payload = make()
    for form in (payload, json.dumps({"id": "b", "image": base64.b64encode(payload)
                                      .decode()}).encode()):
        error = refused(codec, form)
        assert error.code == ErrorCode.IMAGE_TOO_LARGE.value
        assert "Pipeline:MaxImagePixels" in error.message
    assert calls == []
    assert peak_rss_mb() - before < 100


def test_a_jpeg_with_a_thousand_repeated_scans_is_refused_undecoded(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    error = refused(codec, jpeg_scan_bomb(512, 512, 1000))
    assert error.code == ErrorCode.IMAGE_DECODE_FAILED.value and "scans" in error.message
    assert calls == []
    # An ordinary progressive JPEG (6 scans) still decodes.
    assert codec.decode(jpeg_scan_bomb(64, 64, 0)).items[0].shape == (1, 8, 8)


def test_the_pixel_limit_is_inclusive_and_configurable(digits: Model) -> None:
    small = Codec(digits, Limits(4 * MB, 64, max_image_pixels=64))
    assert small.decode(jpeg(8, 8)).items[0].shape == (1, 8, 8)
    assert refused(small, jpeg(9, 8)).code == ErrorCode.IMAGE_TOO_LARGE.value


def test_a_batch_is_checked_whole_before_any_image_is_decoded(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    good = base64.b64encode(jpeg()).decode()
    bomb = base64.b64encode(jpeg_claiming(6000, 6000)).decode()
    payload = json.dumps({"id": "b", "items": [{"image": good}] * 63 + [{"image": bomb}]})
    error = refused(codec, payload.encode())
    assert error.code == ErrorCode.IMAGE_TOO_LARGE.value and error.request_id == "b"
    assert "items[63]" in error.message
    assert calls == []


def test_a_message_s_images_together_may_declare_four_times_the_pixel_limit(
    digits: Model
) -> None:
    small = Codec(digits, Limits(4 * MB, 64, max_image_pixels=64))
    four = json.dumps({"items": [{"image": base64.b64encode(jpeg(8, 8)).decode()}] * 4})
    assert len(small.decode(four.encode()).items) == 4
    five = json.dumps({"id": "five",
                       "items": [{"image": base64.b64encode(jpeg(8, 8)).decode()}] * 5})
    error = refused(small, five.encode())
    assert error.code == ErrorCode.IMAGE_TOO_LARGE.value and "in all" in error.message


def test_a_png_whose_header_is_smaller_than_its_data_decodes_at_the_header_size(
    codec: Codec
) -> None:
    # 8x8 declared, 2000 rows of 2000 pixels carried: libpng stops at the declared size.
    before = peak_rss_mb()
    item = codec.decode(png_lying_small(8, 8, 2000, 2000)).items[0]
    assert item.shape == (1, 8, 8)
    assert peak_rss_mb() - before < 100


def test_an_animated_png_whose_frame_outgrows_its_canvas_is_refused(codec: Codec) -> None:
    # The canvas (IHDR) is what the limit sees; OpenCV refuses frames larger than it.
    before = peak_rss_mb()
    error = refused(codec, apng_with_frame(3000, 3000))
    assert error.code == ErrorCode.IMAGE_DECODE_FAILED.value
    assert peak_rss_mb() - before < 100


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
def test_compressed_png_side_chunks_do_not_inflate(codec: Codec, kind: bytes) -> None:
    # libpng caps what it inflates for side chunks (8 MB); the pixels still decode.
    before = peak_rss_mb()
    assert codec.decode(png_with_chunk_bomb(kind)).items[0].shape == (1, 8, 8)
    assert peak_rss_mb() - before < 100


def test_a_jpeg_whose_header_claims_more_than_its_data_is_bounded_by_the_header(
    digits: Model
) -> None:
    # 2000x2000 declared (under a 4M limit), 8x8 of data: whatever libjpeg makes of it is
    # at most 4 MB of pixels, and the answer is a coded error or a result, never a crash.
    small = Codec(digits, Limits(4 * MB, 64, max_image_pixels=4_000_000))
    try:
        assert small.decode(jpeg_claiming(2000, 2000)).items[0].shape == (1, 8, 8)
    except RequestError as exc:
        assert exc.code == ErrorCode.IMAGE_DECODE_FAILED.value


def test_npy_headers_are_checked_before_numpy_allocates(codec: Codec) -> None:
    before = peak_rss_mb()
    huge = refused(codec, npy_lying((100000, 100000)))
    assert huge.code == ErrorCode.TENSOR_TOO_LARGE.value
    assert "Pipeline:MaxTensorElements" in huge.message
    assert refused(codec, npy_lying((1, 8, 9))).code == ErrorCode.TENSOR_SHAPE_MISMATCH.value
    # Right shape, too little data: the header lies about the data that follows.
    assert refused(codec, npy_lying((1, 8, 8))).code == ErrorCode.UNSUPPORTED_PAYLOAD.value
    assert refused(codec, npy_lying((65, 1, 8, 8))).code == ErrorCode.BATCH_TOO_LARGE.value
    assert refused(codec, npy_lying((-1, 8, 8))).code == ErrorCode.UNSUPPORTED_PAYLOAD.value
    assert refused(codec, npy_lying((1, 8, 8), "|S8")).code == \
        ErrorCode.TENSOR_DTYPE_INVALID.value
    trailing = npy(np.zeros((1, 8, 8), np.float32)) + b"x"
    assert refused(codec, trailing).code == ErrorCode.UNSUPPORTED_PAYLOAD.value
    assert peak_rss_mb() - before < 100


def test_npy_byte_orders_and_layouts_still_decode(codec: Codec) -> None:
    values = np.arange(128, dtype=np.float64).reshape(2, 1, 8, 8) / 128
    for array in (values, values.astype(">f4"), np.asfortranarray(values),
                  (values * 100).astype(np.uint8)):
        items = codec.decode(npy(array)).items
        assert len(items) == 2
        np.testing.assert_allclose(np.stack(items), array.astype(np.float32), rtol=1e-6)


def test_json_tensors_count_against_the_element_limit(digits: Model) -> None:
    small = Codec(digits, Limits(4 * MB, 64, max_tensor_elements=100))
    assert small.decode(json_tensor(np.zeros((1, 8, 8)).tolist(), "ok")).items
    error = refused(small, json_tensor(np.zeros((2, 1, 8, 8)).tolist(), "t"))
    assert error.code == ErrorCode.TENSOR_TOO_LARGE.value and error.request_id == "t"


def test_deep_json_is_refused_without_recursion(codec: Codec) -> None:
    for depth in (100_000, MAX_JSON_DEPTH + 1):
        error = refused(codec, json_nested(depth))
        assert error.code == ErrorCode.INVALID_JSON.value
        assert "levels" in error.message
    # Brackets inside strings (escaped quotes included) are text, not nesting.
    tricky = json.dumps({"id": '\\"' + "[" * 200, "tensor": np.zeros((1, 8, 8)).tolist()})
    assert codec.decode(tricky.encode()).request_id == '\\"' + "[" * 200
    assert bounds.json_depth(b'{"a": [[1], {"b": "]]]]"}]}') == 3
    assert bounds.json_depth(b"[" * 100_000) == 100_000
    assert bounds.json_depth(b'{"a": "\\\\", "b": [1, "\\"[{"]}') == 2


@pytest.mark.parametrize("unit", [b"[],", b"{},", b'"",', b'{"a": 1},'])
def test_json_with_too_many_values_is_refused_before_parsing(codec: Codec, unit: bytes) -> None:
    before = peak_rss_mb()
    payload = b'{"id": "x", "tensor": [' + unit * ((4 * MB - 40) // len(unit)) + b"0]}"
    error = refused(codec, payload)
    assert error.code == ErrorCode.INVALID_JSON.value and "65,536" in error.message
    assert peak_rss_mb() - before < 30  # parsed, these would cost 110-140 MB


def test_json_with_many_numbers_is_still_parsed(codec: Codec) -> None:
    rows = np.zeros((64, 1, 8, 8)).tolist()
    assert len(codec.decode(json_tensor(rows, "rows")).items) == 64


@pytest.mark.parametrize("payload", [
    b'{"id": "\xff\xfe", "tensor": [1]}',
    b'{"id": "ok", "tensor": [1], "\xc3\x28": 1}',
    b'{"id": "x", "image": "\xed\xa0\x80"}',
])
def test_invalid_utf8_is_invalid_json(codec: Codec, payload: bytes) -> None:
    assert refused(codec, payload).code == ErrorCode.INVALID_JSON.value


def test_lone_surrogate_ids_are_refused(codec: Codec) -> None:
    payload = b'{"id": "\\ud800", "tensor": ' + json.dumps(np.zeros((1, 8, 8)).tolist()) \
        .encode() + b"}"
    assert refused(codec, payload).code == ErrorCode.INVALID_REQUEST.value


@pytest.mark.parametrize("payload", [
    npy(np.full((1, 8, 8), np.nan, np.float32)),
    npy(np.full((1, 8, 8), np.inf)),
    b'{"tensor": ' + json.dumps([[[float("-inf")] * 8] * 8]).encode() + b"}",
    b'{"tensor": [[' + b",".join([b"[" + b",".join([b"1e999"] * 8) + b"]"] * 8) + b"]]}",
])
def test_nan_and_infinite_tensors_are_refused(codec: Codec, payload: bytes) -> None:
    assert refused(codec, payload).code == ErrorCode.TENSOR_VALUE_INVALID.value


def test_ten_kilobyte_ids_and_oversized_payloads(codec: Codec) -> None:
    long_id = json.dumps({"id": "i" * 10_240, "tensor": np.zeros((1, 8, 8)).tolist()})
    assert refused(codec, long_id.encode()).code == ErrorCode.INVALID_REQUEST.value
    over = b'{"id": "big", "tensor": [' + b" " * (4 * MB) + b"]}"
    over = over[:4 * MB + 1]
    assert len(over) == 4 * MB + 1
    assert refused(codec, over).code == ErrorCode.PAYLOAD_TOO_LARGE.value


@pytest.mark.parametrize("ext", [".bmp", ".tiff", ".webp", ".pgm"])
def test_formats_whose_header_is_not_parsed_are_refused_undecoded(codec: Codec,
                                                                  ext: str) -> None:
    ok, data = cv2.imencode(ext, np.zeros((8, 8), np.uint8))
    assert ok
    assert refused(codec, bytes(data)).code == ErrorCode.UNSUPPORTED_PAYLOAD.value
    as_json = json.dumps({"id": "f", "image": base64.b64encode(bytes(data)).decode()})
    assert refused(codec, as_json.encode()).code == ErrorCode.IMAGE_DECODE_FAILED.value
