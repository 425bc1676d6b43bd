"""Lesson 02's download (issue 13): one weight format, the disk checked first, resumed downloads counted. No network:
ModelScope's listing and ``snapshot_download`` are replaced by fakes with the real repository's shape."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from glmlora import download

GB = 10 ** 9
SUPPORT = {"config.json": 1_317, "configuration_chatglm.py": 2_332, "modeling_chatglm.py": 55_596,
           "quantization.py": 14_692, "tokenization_chatglm.py": 11_279, "tokenizer.model": 1_018_370,
           "tokenizer_config.json": 244, "README.md": 4_527, "MODEL_LICENSE": 4_133, ".gitattributes": 1_519,
           "configuration.json": 38, "resources/wechat.jpg": 151_822}
SAFETENSORS = {**{f"model-0000{i}-of-00007.safetensors": 1_827_774_232 for i in range(1, 8)},
               "model.safetensors.index.json": 20_437}
BIN = {**{f"pytorch_model-0000{i}-of-00007.bin": 1_827_781_090 for i in range(1, 8)},
       "pytorch_model.bin.index.json": 20_437}


def test_both_formats_listed_downloads_safetensors_only():
    chosen = download.choose_files({**SUPPORT, **SAFETENSORS, **BIN})
    assert set(SAFETENSORS) <= set(chosen)
    assert not any(name.endswith(".bin") or "pytorch_model" in name for name in chosen)
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "modeling_chatglm.py",
                 "configuration_chatglm.py", "tokenization_chatglm.py", "MODEL_LICENSE"):
        assert name in chosen
    assert "resources/wechat.jpg" not in chosen and ".gitattributes" not in chosen
    assert chosen == sorted(chosen)


def test_bin_shards_when_there_are_no_safetensors():
    chosen = download.choose_files(sorted({**SUPPORT, **BIN}))  # a plain list of names works too
    assert set(BIN) <= set(chosen) and "pytorch_model.bin.index.json" in chosen
    assert not any(name.endswith(".safetensors") for name in chosen)


def test_no_weights_at_all_is_an_error_naming_the_files():
    with pytest.raises(RuntimeError, match=r"no weight files .* among the 12 files listed: .*config.json"):
        download.choose_files(SUPPORT)


def test_download_size_counts_one_format():
    listing = {**SUPPORT, **SAFETENSORS, **BIN}
    size = download.download_size(listing)
    assert size == sum(SAFETENSORS.values()) + sum(v for k, v in SUPPORT.items()
                                                    if k in download.choose_files(listing))
    assert 12.7 * GB < size < 12.9 * GB  # one copy of the weights, not two


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_disk_space_message_names_the_directory_needed_and_free(monkeypatch, tmp_path):
    seen = []

    def usage(path):
        seen.append(path)
        return DiskUsage(50 * GB, 42 * GB, 8 * GB)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    target = tmp_path / "models" / "not-yet"
    with pytest.raises(RuntimeError) as err:
        download.check_free_space(target, 25_500_000_000)
    message = str(err.value)
    assert str(target) in message and "25.5 GB needed" in message and "8.0 GB free" in message
    assert "GLMLORA_MODEL_CACHE" in message
    assert seen == [tmp_path]  # measured on the nearest folder that exists
    assert download.check_free_space(target, 7 * GB) == 8 * GB


def test_download_checks_space_before_fetching_and_counts_finished_files(monkeypatch, tmp_path):
    """The space needed is what is still missing (a resumed download) plus the converted copy; nothing is fetched
    when it does not fit."""
    listing = {**SUPPORT, **SAFETENSORS, **BIN}
    monkeypatch.setattr(download, "repo_listing", lambda model_id=download.MODEL_ID, revision=None: listing)
    done = tmp_path / download.MODEL_ID
    done.mkdir(parents=True)
    first = "model-00001-of-00007.safetensors"
    with open(done / first, "wb") as f:  # a finished shard: same size as listed (sparse file)
        f.truncate(SAFETENSORS[first])
    asked = {}
    monkeypatch.setattr(download, "check_free_space", lambda d, n: asked.update(dir=d, needed=n))
    fetched = {}

    def snapshot_download(model_id, cache_dir=None, allow_patterns=None):
        fetched.update(model_id=model_id, cache_dir=cache_dir, allow_patterns=allow_patterns)
        return str(done)

    import modelscope

    monkeypatch.setattr(modelscope, "snapshot_download", snapshot_download)
    assert download.download_chatglm3(tmp_path) == done
    weights = sum(SAFETENSORS.values()) - SAFETENSORS["model.safetensors.index.json"]
    assert asked == {"dir": tmp_path, "needed": download.download_size(listing) - SAFETENSORS[first] + weights}
    assert fetched["allow_patterns"] == download.choose_files(listing)
    assert fetched["model_id"] == "ZhipuAI/chatglm3-6b" and fetched["cache_dir"] == str(tmp_path)


def test_no_space_means_no_download(monkeypatch, tmp_path):
    monkeypatch.setattr(download, "repo_listing", lambda model_id=download.MODEL_ID, revision=None: {**SUPPORT,
                                                                                                     **SAFETENSORS})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(50 * GB, 45 * GB, 5 * GB))
    import modelscope

    monkeypatch.setattr(modelscope, "snapshot_download", lambda *a, **k: pytest.fail("must not start downloading"))
    with pytest.raises(RuntimeError, match=r"not enough disk space .* 25\.\d GB needed, 5\.0 GB free"):
        download.download_chatglm3(tmp_path)


def test_listing_comes_from_modelscopes_hub_api(monkeypatch):
    from modelscope.hub import api

    class FakeApi:
        def get_model_files(self, model_id, revision=None, recursive=True):
            assert model_id == "ZhipuAI/chatglm3-6b" and recursive
            return [{"Path": "config.json", "Size": 1317}, {"Path": "model.safetensors.index.json", "Size": 20437}]

    monkeypatch.setattr(api, "HubApi", FakeApi)
    assert download.repo_listing() == {"config.json": 1317, "model.safetensors.index.json": 20437}
    assert download.repo_files() == ["config.json", "model.safetensors.index.json"]


def test_pipeline_keeps_the_old_import():
    from glmlora.pipeline import download_chatglm3

    assert download_chatglm3 is download.download_chatglm3
