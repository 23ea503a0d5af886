import numpy as np
import pytest

from vigild.frame import NO_TRACK, Detections


def make(n: int = 3) -> Detections:
    xyxy = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return Detections.untracked(xyxy, np.linspace(0.1, 0.9, n), np.arange(n), ("person", "car", "dog"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("xyxy", np.zeros((3, 5)), r"Detections.xyxy: expected shape \(N, 4\), got \(3, 5\)"),
        ("xyxy", np.zeros(12), r"Detections.xyxy: expected shape \(N, 4\), got \(12,\)"),
        ("confidence", np.zeros(2), r"Detections.confidence: expected shape \(3,\), got \(2,\)"),
        ("class_id", np.zeros((3, 1)), r"Detections.class_id: expected shape \(3,\), got \(3, 1\)"),
        ("tracker_id", np.zeros(4), r"Detections.tracker_id: expected shape \(3,\), got \(4,\)"),
    ],
)
def test_creation_rejects_mismatched_shapes_with_expected_and_actual(field, value, message):
    arrays = {"xyxy": np.zeros((3, 4)), "confidence": np.zeros(3), "class_id": np.zeros(3), "tracker_id": np.zeros(3)}
    arrays[field] = value
    with pytest.raises(ValueError, match=message):
        Detections(**arrays)


def test_arrays_are_normalised_to_documented_dtypes():
    d = make()
    assert (d.xyxy.dtype, d.confidence.dtype, d.class_id.dtype, d.tracker_id.dtype) == (
        np.float32,
        np.float32,
        np.int32,
        np.int64,
    )
    assert (d.tracker_id == NO_TRACK).all()


def test_boolean_selection_keeps_parallel_arrays_aligned():
    d = make()
    picked = d[d.confidence > 0.4]
    assert len(picked) == 2
    assert picked.class_id.tolist() == [1, 2]
    assert picked.xyxy[0].tolist() == [4, 5, 6, 7]
    assert picked.label(0) == "car"


def test_empty_and_unknown_labels():
    assert len(Detections.empty()) == 0
    d = Detections.untracked(np.zeros((1, 4)), np.ones(1), np.array([7]), ("person",))
    assert d.label(0) == "7"


def test_per_object_data_must_have_one_row_per_object_and_says_which_key_does_not():
    d = make()
    with pytest.raises(ValueError, match=r"Detections.data\['speed'\]: expected first dimension 3, got shape \(2,\)"):
        d.with_data(speed=np.zeros(2))
    with pytest.raises(ValueError, match=r"Detections.data\['zone'\]: expected first dimension 3, got shape \(\)"):
        Detections(d.xyxy, d.confidence, d.class_id, d.tracker_id, data={"zone": np.float32(1)})
    assert make().data == {}


def test_with_data_makes_new_detections_and_selections_keep_the_rows_data():
    d = make()
    speed = np.array([1.0, 2.0, 3.0])
    names = np.array(["a", None, "c"], object)
    extended = d.with_data(speed=speed, names=names, box=np.arange(12).reshape(3, 2, 2))
    assert d.data == {} and set(extended.data) == {"speed", "names", "box"}  # the original is left as it was
    again = extended.with_data(speed=speed * 10)
    assert again.data["speed"].tolist() == [10.0, 20.0, 30.0] and extended.data["speed"].tolist() == [1, 2, 3]
    picked = extended[extended.confidence > 0.4]
    assert picked.data["speed"].tolist() == [2.0, 3.0]
    assert picked.data["names"].tolist() == [None, "c"]
    assert picked.data["box"].shape == (2, 2, 2) and picked.data["box"][1].tolist() == [[8, 9], [10, 11]]
    assert extended[1:2].data["names"].tolist() == [None]
    retracked = extended.with_tracker_ids(np.array([7, 8, 9]))
    assert retracked.data["speed"].tolist() == [1.0, 2.0, 3.0] and retracked.tracker_id.tolist() == [7, 8, 9]
