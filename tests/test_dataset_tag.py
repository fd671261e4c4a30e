"""The dataset tag: RealEstate10K-layout sets such as ACID read by the ``re10k`` reader under their own
name in scene records, planned windows (manifest ``dataset`` column, window ids) and ``cache.json``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cameo_corr.datasets import open_dataset
from cameo_corr.datasets.synthetic import generate_dataset
from cameo_corr.datasets.planner import default_plan_config, plan_windows
from cameo_corr.schemas import DatasetError

FP = {"schema_version": 1, "grid": [16, 16], "tau": 1.5, "backend": {"name": "depth"}, "crop": {"policy": "center", "size": 64}}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("acid") / "data", scenes=2, frames=6, image_size=16, seed=2,
                            layout="re10k", split="test")


def test_tag_names_the_dataset_everywhere(clips: Path) -> None:
    plain = open_dataset("re10k", clips)
    acid = open_dataset("re10k", clips, tag="acid")
    assert plain.tag == "re10k" and "tag" not in plain.describe()
    assert acid.name == "re10k" and acid.tag == "acid" and acid.describe()["tag"] == "acid"
    assert acid.scene("scene_0000").dataset == "acid"
    plan = default_plan_config(acid.name, views=3)  # sampling follows the layout (timestamps), not the tag
    assert plan.positions == "timestamp_us"
    w_plain, w_acid = plan_windows(plain, plan, FP), plan_windows(acid, plan, FP)
    assert [w.record.frame_ids for w in w_plain] == [w.record.frame_ids for w in w_acid]  # same sampling
    assert {w.record.dataset for w in w_acid} == {"acid"}  # the manifest's dataset column
    assert not {w.record.window_id for w in w_plain} & {w.record.window_id for w in w_acid}  # distinct identities
    described = acid.describe()  # what cache.json records and the workers / the trainer reopen
    reopened = open_dataset(described.pop("name"), described.pop("root"), **described)
    assert reopened.tag == "acid" and reopened.scene("scene_0001").dataset == "acid"
    (clips / "test" / "broken.txt").write_text("url\n1 2 3\n")
    try:
        failed = [w for w in plan_windows(acid, plan, FP) if w.error]
    finally:
        (clips / "test" / "broken.txt").unlink()
    assert [(w.record.dataset, w.record.scene_id) for w in failed] == [("acid", "broken")]


@pytest.mark.parametrize("options,field,match", [
    ({"name": "acid"}, "name", "name the dataset with the option tag=acid"),
    ({"tag": "co3d"}, "tag", "is the name of another reader"),
    ({"tag": "a/b"}, "tag", "letters, digits"),
    ({"tag": ""}, "tag", "letters, digits"),
    ({"downscale": 2}, "downscale", r"unknown option 'downscale' of reader 're10k'; it takes \['split', 'frames_root', 'tag'\]"),
])
def test_bad_tags(clips: Path, options: dict, field: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match) as e:
        open_dataset("re10k", clips, **options)
    assert e.value.field == field and e.value.path == str(clips)
    assert open_dataset("re10k", clips, tag="re10k").describe().get("tag") is None  # its own name is the default
