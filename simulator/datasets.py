"""Data sets shared by the training script, the publisher and the tests.

* digits: scikit-learn's bundled 8x8 digits, split once with a fixed seed;
  the held-out quarter is what accuracy is measured on.
* telemetry: a synthetic but physically plausible centrifugal-pump data set
  (eight sensors, four operating states), made with a fixed seed.
"""

from __future__ import annotations

import cv2
import numpy as np

TELEMETRY_FEATURES = [
    "bearing_temp_c",
    "vibration_rms_mm_s",
    "vibration_peak_hz",
    "suction_pressure_bar",
    "discharge_pressure_bar",
    "flow_m3_h",
    "motor_current_a",
    "speed_rpm",
]
TELEMETRY_LABELS = ["normal", "bearing_wear", "cavitation", "overheating"]


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x_train, x_test, y_train, y_test`` with pixels scaled to 0..1 (needs scikit-learn)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    parts = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    return parts[0], parts[1], parts[2], parts[3]


def digit_image(pixels: np.ndarray, fmt: str = ".png") -> bytes:
    """An 8x8 digit (values 0..1) as a 32x32 PNG or JPEG, as a camera app would send it."""
    image = np.clip(np.round(pixels.reshape(8, 8) * 255), 0, 255).astype(np.uint8)
    image = np.asarray(cv2.resize(image, (32, 32), interpolation=cv2.INTER_NEAREST),
                       dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(fmt, image, params)
    if not ok:
        raise ValueError(f"cannot encode {fmt}")
    return bytes(data.tobytes())


def telemetry_dataset(n_per_class: int = 1500, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Pump telemetry: four operating states with correlated sensors."""
    rng = np.random.RandomState(seed)
    rows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for label in range(len(TELEMETRY_LABELS)):
        speed = rng.normal(2950, 40, n_per_class)
        flow = rng.normal(120, 12, n_per_class) * speed / 2950
        suction = rng.normal(1.8, 0.15, n_per_class)
        discharge = suction + 0.045 * flow + rng.normal(0, 0.2, n_per_class)
        current = 0.28 * flow + rng.normal(8, 1.2, n_per_class)
        temp = rng.normal(55, 4, n_per_class) + 0.02 * current
        vib = np.abs(rng.normal(2.2, 0.5, n_per_class))
        peak = speed / 60 + rng.normal(0, 1.5, n_per_class)
        if label == 1:  # bearing wear: high-frequency vibration, warmer bearing
            vib += np.abs(rng.normal(3.0, 1.0, n_per_class))
            peak *= rng.uniform(3.2, 5.5, n_per_class)
            temp += rng.normal(8, 3, n_per_class)
        elif label == 2:  # cavitation: low suction, noisy flow, broadband vibration
            suction -= np.abs(rng.normal(1.1, 0.3, n_per_class))
            flow *= rng.uniform(0.7, 0.95, n_per_class)
            vib += np.abs(rng.normal(1.8, 0.8, n_per_class))
            peak += rng.normal(0, 60, n_per_class)
        elif label == 3:  # overheating: hot bearing, high current
            temp += np.abs(rng.normal(25, 6, n_per_class))
            current *= rng.uniform(1.15, 1.4, n_per_class)
        rows.append(np.stack([temp, vib, peak, suction, discharge, flow, current, speed], axis=1))
        labels.append(np.full(n_per_class, label))
    return np.concatenate(rows), np.concatenate(labels)
