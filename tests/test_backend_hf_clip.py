"""The hf-clip backend against transformers itself: a tiny random-init CLIPModel saved in PLIP's hub layout
(config.json, model.safetensors, CLIP BPE tokenizer files, preprocessor_config.json), loaded through histoclip's
config, must embed real tiles and prompts as transformers' own CLIPImageProcessor + get_image_features and
tokenizer + get_text_features do; bad folders must fail with errors that name what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import hf_clip_folder

from histoclip.embedding.backends import model_files
from histoclip.embedding.backends.hf_clip_backend import BACKEND
from histoclip.embedding.models import ModelSpec, load_model
from histoclip.errors import InputError
from histoclip.store import sha256_file

transformers = pytest.importorskip("transformers")

SIZE = 64  # the tiny model's input size (crop_size); tiles are read at 224 px and resized to it
PROMPTS = ["an H&E image of tumor tissue", "lymphocytes", "normal stroma with a few fibroblasts", ""]


@pytest.fixture(scope="module")
def plip(tmp_path_factory) -> Path:
    return hf_clip_folder(tmp_path_factory.mktemp("plip"), SIZE)


@pytest.fixture
def plip_copy(plip, tmp_path) -> Path:
    return Path(shutil.copytree(plip, tmp_path / "plip"))


@pytest.fixture(scope="module")
def tiles(shared_data) -> np.ndarray:
    """8 tissue tiles of 224 px (uint8 NHWC) from the real slide CMU-1-Small-Region."""
    from histoclip.tiling.slide import open_wsi, read_rgb

    with open_wsi(shared_data / "svs" / "CMU-1-Small-Region.svs", "cmu1") as slide:
        return np.stack([read_rgb(slide, (x, y), 0, (224, 224)) for x in (750, 1000, 1250, 1500) for y in (1200, 2100)])


def spec_of(folder: Path | str, **extra) -> ModelSpec:
    return ModelSpec.from_config("plip", {"backend": "hf-clip", "model": str(folder), **extra})


def reference(folder: Path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    return (
        CLIPModel.from_pretrained(folder).eval(),
        CLIPImageProcessor.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
    )


def pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.mark.shared_data
@pytest.mark.parametrize("tile_px", [224, SIZE])
def test_tiles_embed_as_clip_image_processor_and_get_image_features_do(plip, tiles, tile_px):
    """224 px tiles: histoclip resizes the normalised float tile on the device, CLIPImageProcessor the uint8
    tile (shortest edge, then a center crop that drops nothing for a square tile), so they differ by resampling
    only. Tiles already at the model size are not resized by either: they agree up to float rounding."""
    from histoclip.tiling.slide import resize_rgb

    batch = tiles if tile_px == 224 else np.stack([resize_rgb(tile, (tile_px, tile_px)) for tile in tiles])
    loaded = load_model(spec_of(plip), "cpu")
    ours = loaded.encode_tiles(torch.from_numpy(batch))
    model, processor, _ = reference(plip)
    with torch.inference_mode():
        pixels = processor(images=list(batch), return_tensors="pt")["pixel_values"]
        theirs = torch.nn.functional.normalize(pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
    similarity = cosines(ours, theirs)
    across = ours @ theirs.T  # a tiny random-init CLIP maps all H&E tiles close together (cosines ~0.9)
    print(
        f"hf-clip image parity at {tile_px} px: mean cosine {similarity.mean():.7f}, min {similarity.min():.7f}; "
        f"between different tiles: mean {across[~torch.eye(len(batch), dtype=torch.bool)].mean():.4f}"
    )
    assert ours.shape == (len(batch), 24)
    assert similarity.mean() >= (0.99 if tile_px == 224 else 0.9999)
    assert torch.equal(across.argmax(dim=1), torch.arange(len(batch)))  # each tile nearest its own reference


def test_prompts_embed_as_the_folder_tokenizer_and_get_text_features_do(plip):
    loaded = load_model(spec_of(plip), "cpu")
    ours = loaded.encode_texts(PROMPTS)
    model, _, tokenizer = reference(plip)
    with torch.inference_mode():
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        theirs = torch.nn.functional.normalize(pooled(model.get_text_features(**tokens)), dim=-1)
    similarity = cosines(ours, theirs)
    across = ours @ theirs.T
    print(f"hf-clip text parity: mean cosine {similarity.mean():.7f}, min {similarity.min():.7f}")
    assert similarity.min() >= 0.999
    assert torch.equal(across.argmax(dim=1), torch.arange(len(PROMPTS)))
    assert loaded.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    long = loaded.encode_texts(["tumor " * 200])  # truncated to the 77-token context, not an error
    assert long.shape == (1, 24)


def test_what_the_loaded_model_says_about_itself(plip):
    processor = json.loads((plip / "preprocessor_config.json").read_text())
    loaded = load_model(spec_of(plip), "cpu")
    assert (loaded.dim, loaded.image_size, loaded.interpolation) == (24, SIZE, "bicubic")
    assert loaded.mean == pytest.approx(processor["image_mean"]) and loaded.std == pytest.approx(processor["image_std"])
    assert loaded.weights == str(plip / "model.safetensors")
    assert loaded.weights_sha256 == sha256_file(plip / "model.safetensors")
    assert loaded.has_text and BACKEND.has_text({"backend": "hf-clip", "model": str(plip)})
    assert "get_image_features" in loaded.space
    assert loaded.provenance()["backend"] == "hf-clip"
    assert "patch 16" in loaded.architecture
    ids = loaded.model.text_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(77).expand(1, -1))  # derived buffers filled, not left as to_empty's garbage


def test_files_are_the_config_and_the_weights_it_loads(plip_copy):
    entry = {"backend": "hf-clip", "model": str(plip_copy)}
    assert model_files("plip", entry) == [str(plip_copy / "config.json"), str(plip_copy / "model.safetensors")]
    torch.save({"x": torch.zeros(1)}, plip_copy / "pytorch_model.bin")  # safetensors is preferred, as transformers does
    assert model_files("plip", entry)[-1] == str(plip_copy / "model.safetensors")
    assert BACKEND.files({"model": str(plip_copy / "absent")}) == []


def test_a_good_folder_passes_the_check_and_a_missing_preprocessor_is_a_warning(plip_copy):
    assert BACKEND.check(spec_of(plip_copy)) == []
    (plip_copy / "preprocessor_config.json").unlink()
    findings = BACKEND.check(spec_of(plip_copy))
    assert [severity for severity, _ in findings] == ["warning"]
    assert load_model(spec_of(plip_copy), "cpu").image_size == SIZE  # from the vision config


def rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors")


def assert_refused(spec: ModelSpec, *needles: str) -> None:
    """Both the preflight check and the load refuse, with a message holding every needle."""
    findings = BACKEND.check(spec)
    assert [severity for severity, _ in findings] == ["error"], findings
    with pytest.raises(InputError) as raised:
        load_model(spec, "cpu")
    for text in (str(findings[0][1]), str(raised.value)):
        for needle in needles:
            assert needle in text, (needle, text)


def test_a_missing_weight_is_named(plip_copy):
    rewrite_weights(plip_copy, lambda state: state.pop("visual_projection.weight"))
    assert_refused(spec_of(plip_copy), "missing", "visual_projection.weight")


def test_an_extra_weight_is_named_but_old_position_ids_are_accepted(plip_copy):
    def old_transformers(state):
        state["text_model.embeddings.position_ids"] = torch.arange(77).expand(1, -1).contiguous()

    rewrite_weights(plip_copy, old_transformers)
    assert BACKEND.check(spec_of(plip_copy)) == []
    assert load_model(spec_of(plip_copy), "cpu").dim == 24
    rewrite_weights(plip_copy, lambda state: state.update({"text_model.extra_head.weight": torch.zeros(3)}))
    assert_refused(spec_of(plip_copy), "unexpected", "text_model.extra_head.weight")


def test_a_misshapen_weight_is_named(plip_copy):
    rewrite_weights(plip_copy, lambda state: state.update({"text_projection.weight": torch.zeros(16, 32)}))
    assert_refused(spec_of(plip_copy), "shape", "text_projection.weight")


class NotAStateDict:
    """Any pickled object: unpickling it could run code."""

    def __init__(self) -> None:
        self.weights = [torch.zeros(2)]


@pytest.mark.parametrize(
    ("payload", "needle"), [(NotAStateDict(), "refused because unpickling"), ([torch.zeros(2)], "not a state dict")]
)
def test_a_pickled_bin_that_is_not_a_state_dict_is_refused(plip_copy, payload, needle):
    (plip_copy / "model.safetensors").unlink()
    torch.save(payload, plip_copy / "pytorch_model.bin")
    assert_refused(spec_of(plip_copy), "pytorch_model.bin", needle)


def test_a_folder_without_tokenizer_files_names_them(plip_copy):
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (plip_copy / name).unlink()
    assert_refused(spec_of(plip_copy), "no tokenizer files", "vocab.json, merges.txt missing")


def test_a_folder_without_weights_or_config_or_of_another_model_says_so(plip_copy, tmp_path):
    (plip_copy / "model.safetensors").unlink()
    assert_refused(spec_of(plip_copy), "no weights")
    with pytest.raises(InputError, match="is not a folder"):
        load_model(spec_of(tmp_path / "absent"), "cpu")
    config = json.loads((plip_copy / "config.json").read_text())
    (plip_copy / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(InputError, match="not a transformers CLIPModel config"):
        BACKEND.check(spec_of(plip_copy))


def test_hf_hub_reads_the_hugging_face_cache_offline(plip, monkeypatch, tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--vinid--plip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(plip, repo / "snapshots" / revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = spec_of("hf-hub:vinid/plip")
    assert spec.model == "hf-hub:vinid/plip"
    assert BACKEND.check(spec) == []
    files = model_files("plip", {"backend": "hf-clip", "model": "hf-hub:vinid/plip"})
    assert files[-1] == str(repo / "snapshots" / revision / "model.safetensors")
    assert model_files("plip", {"backend": "hf-clip", "model": "hf-hub:vinid/absent"}) == []
    hub = load_model(spec, "cpu")
    local = load_model(spec_of(plip), "cpu")
    assert hub.weights_sha256 == local.weights_sha256
    assert torch.allclose(hub.encode_texts(PROMPTS), local.encode_texts(PROMPTS))
    with pytest.raises(InputError, match="not in the Hugging Face cache") as raised:
        load_model(spec_of("hf-hub:vinid/absent"), "cpu")
    assert "huggingface-cli download vinid/absent" in raised.value.fix


def test_another_image_size_interpolates_the_position_embeddings(plip):
    loaded = load_model(spec_of(plip, image_size=48), "cpu")
    tiles = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8)
    assert loaded.image_size == 48 and loaded.encode_tiles(tiles).shape == (2, 24)


def test_the_preflight_reports_the_backend_findings_as_problems(plip_copy, tmp_path):
    from histoclip.preflight.models import check_model

    (plip_copy / "tokenizer.json").unlink()
    (plip_copy / "merges.txt").unlink()
    problems = check_model("plip", {"backend": "hf-clip", "model": str(plip_copy)}, {})
    assert [p.severity for p in problems] == ["error"] and "merges.txt missing" in problems[0].problem
    absent = check_model("plip", {"backend": "hf-clip", "model": str(tmp_path / "nowhere")}, {})
    assert [p.severity for p in absent] == ["error"] and "is not a folder" in absent[0].problem


def test_rule_inputs_are_found_without_importing_torch(plip):
    """files() runs while Snakemake plans the run: no torch, no transformers (seconds per parse otherwise)."""
    code = (
        "import sys; from histoclip.embedding.backends import model_files; "
        f"model_files('p', {{'backend': 'hf-clip', 'model': {str(plip)!r}}}); "
        "model_files('p', {'backend': 'hf-clip', 'model': 'hf-hub:org/absent'}); "
        "assert not {'torch', 'transformers'} & set(sys.modules), 'imported torch or transformers'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
