"""The timm backend (UNI, Virchow2, H-optimus, ...): parity with timm's own loading, transform and forward on real
tiles, the model cards' pooling rules on tiny random-init models of the same structure, and the errors users hit
(a checkpoint that does not fit, a pickle that is not a state dict, an unknown architecture, prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import H_OPTIMUS_MEAN, H_OPTIMUS_STD, timm_hub_folder  # noqa: E402

from histoclip.embedding.backends import backend_named, model_files  # noqa: E402
from histoclip.embedding.backends.timm_backend import POOLINGS  # noqa: E402
from histoclip.embedding.models import ModelSpec, load_model  # noqa: E402
from histoclip.errors import InputError  # noqa: E402


def hub_folder(folder: Path, architecture: str = "vit_tiny_patch16_224", model_args: dict | None = None) -> Path:
    """A random-init timm model saved as its hub repository ships it: config.json + model.safetensors."""
    timm_hub_folder(folder, architecture, model_args)
    return folder


def spec_for(folder: Path | str, **entry) -> ModelSpec:
    return ModelSpec.from_config("uni", {"backend": "timm", "model": str(folder), **entry})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return hub_folder(tmp_path_factory.mktemp("timm") / "UNI")


@pytest.fixture(scope="module")
def tiny_loaded(tiny_folder):
    return load_model(spec_for(tiny_folder), "cpu")


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """The same folder loaded by timm itself (its local-dir: loader, as it loads hub folders)."""
    return timm.create_model(f"local-dir:{tiny_folder}", pretrained=True, num_classes=0).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    one, other = a.state_dict(), b.state_dict()
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


@pytest.fixture(scope="module")
def tiles(shared_data) -> np.ndarray:
    """8 real 256-px tiles of CMU-1-Small-Region (uint8 NHWC), as the embedding stage reads them."""
    from histoclip.tiling.slide import open_wsi, read_rgb

    slide = open_wsi(shared_data / "svs" / "CMU-1-Small-Region.svs", "CMU-1-Small-Region")
    spots = [(x, y) for y in (400, 900) for x in (300, 700, 1100, 1500)]
    return np.stack([read_rgb(slide, spot, 0, (256, 256)) for spot in spots])


@pytest.mark.shared_data
def test_parity_with_timm_on_real_tiles(tiny_loaded, reference, tiles):
    """histoclip (resize on the device, after normalising) vs timm's own local-dir loader, transform (PIL bicubic
    resize of the uint8 tile to 224, crop_pct 1.0) and forward: the same embeddings up to resampling."""
    loaded = tiny_loaded
    ours = loaded.encode_tiles(torch.from_numpy(tiles))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=reference))
    with torch.inference_mode():
        expected = reference(torch.stack([transform(Image.fromarray(tile)) for tile in tiles]))
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1)
    print(f"timm parity on {len(tiles)} real tiles: mean cosine {cosine.mean():.6f}, min {cosine.min():.6f}")
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.98
    assert ours.shape == (8, 192) and loaded.dim == 192
    assert (loaded.image_size, loaded.interpolation) == (224, "bicubic")
    assert loaded.mean == pytest.approx(H_OPTIMUS_MEAN) and loaded.std == pytest.approx(H_OPTIMUS_STD)
    assert loaded.architecture == "vit_tiny_patch16_224" and not loaded.has_text
    provenance = loaded.provenance()
    assert provenance["pooling"] == "cls" and provenance["backend"] == "timm"
    assert provenance["weights"].endswith("model.safetensors") and len(provenance["weights_sha256"]) == 64
    assert "class token" in loaded.space and "no text" in loaded.space


def test_same_input_same_features_as_timm_exactly(tiny_loaded, reference):
    """On an already-preprocessed batch (no resampling involved) the features are timm's, to float precision."""
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(tiny_loaded.image_features(images), reference(images), rtol=1e-5, atol=1e-5)


def test_files_and_check_of_a_good_folder(tiny_folder):
    assert model_files("uni", {"backend": "timm", "model": str(tiny_folder)}) == [
        str(tiny_folder / "config.json"),
        str(tiny_folder / "model.safetensors"),
    ]
    backend = backend_named("timm")
    assert backend.check(spec_for(tiny_folder)) == [] and backend.has_text(spec_for(tiny_folder)) is False


def virchow_like(tmp_path: Path) -> Path:
    """Virchow2's structure, tiny: register tokens, SwiGLUPacked MLP, SiLU, layer scale, global_pool "" (all
    tokens out), as its config.json ships it (the MLP and activation are passed in code by its card)."""
    args = {"reg_tokens": 4, "global_pool": "", "init_values": 1e-5, "dynamic_img_size": True, "mlp_ratio": 5.3375}
    args["depth"] = 2  # the structure, not the depth, is what the pooling rule depends on (fast tests)
    return hub_folder(tmp_path / "Virchow2", model_args={**args, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"})


def strip_layers(folder: Path) -> None:
    """The hub's config.json has no mlp_layer / act_layer (they are Python objects in the card's code)."""
    config = json.loads((folder / "config.json").read_text())
    for key in ("mlp_layer", "act_layer"):
        config["model_args"].pop(key)
    (folder / "config.json").write_text(json.dumps(config))


def test_virchow_pooling_is_cls_then_mean_of_patch_tokens_without_registers(tmp_path):
    folder = virchow_like(tmp_path)
    strip_layers(folder)
    card_args = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}
    loaded = load_model(spec_for(folder, pooling="cls+mean", model_args=card_args), "cpu")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        tokens = loaded.model.forward_features(images)  # [B, 1 + 4 registers + 196 patches, width]
        assert tokens.shape[1] == 1 + 4 + 196
        by_hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
        torch.testing.assert_close(loaded.image_features(images), by_hand)
    assert loaded.dim == 2 * 192 and loaded.provenance()["pooling"] == "cls+mean"
    assert loaded.encode_tiles(torch.zeros(1, 256, 256, 3, dtype=torch.uint8)).shape == (1, 384)
    # without the entry's pooling, the folder's global_pool "" (Virchow's) implies the card's cls+mean
    implied = load_model(spec_for(folder, model_args=card_args), "cpu")
    assert implied.extra["pooling"] == "cls+mean" and implied.dim == 384


def test_virchow_folder_without_the_cards_layers_is_a_mismatch_saying_model_args(tmp_path):
    folder = virchow_like(tmp_path)
    strip_layers(folder)
    findings = backend_named("timm").check(spec_for(folder, pooling="cls+mean"))
    assert [severity for severity, _ in findings] == ["error"]
    assert "mlp.fc2.weight" in str(findings[0][1]) and "model_args" in str(findings[0][1])
    with pytest.raises(InputError, match="shape mismatch"):
        load_model(spec_for(folder, pooling="cls+mean"), "cpu")


def test_cls_and_mean_poolings_exclude_register_tokens(tmp_path):
    """UNI2-h-like (8 registers, class token): cls is token 0; mean skips class and registers."""
    folder = hub_folder(tmp_path / "UNI2-h", model_args={"reg_tokens": 8, "no_embed_class": True, "depth": 2})
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    cls = load_model(spec_for(folder), "cpu")  # global_pool token (timm's default) → cls
    mean = load_model(spec_for(folder, pooling="mean"), "cpu")
    with torch.inference_mode():
        tokens = cls.model.forward_features(images)
        torch.testing.assert_close(cls.image_features(images), tokens[:, 0])
        torch.testing.assert_close(cls.image_features(images), cls.model(images))  # timm's own head
        torch.testing.assert_close(mean.image_features(images), tokens[:, 9:].mean(dim=1))
    assert cls.extra["pooling"] == "cls" and cls.dim == mean.dim == 192
    assert set(POOLINGS) == {"cls", "mean", "cls+mean", "head"}


def test_unknown_pooling_and_unknown_mlp_layer_are_errors(tiny_folder):
    with pytest.raises(InputError, match="pooling 'max' is not one of"):
        load_model(spec_for(tiny_folder, pooling="max"), "cpu")
    with pytest.raises(InputError, match="mlp_layer 'os.system' is not one of"):
        load_model(spec_for(tiny_folder, model_args={"mlp_layer": "os.system"}), "cpu")


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    (target / "config.json").write_bytes((source / "config.json").read_bytes())
    return target


def test_missing_and_extra_keys_are_named(tiny_folder, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_folder / "model.safetensors"))
    missing = copy_folder(tiny_folder, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "blocks.3.attn.qkv.weight"}, str(missing / "model.safetensors"))
    extra = copy_folder(tiny_folder, tmp_path / "extra")
    save_file({**state, "head.weight": torch.zeros(1000, 192)}, str(extra / "model.safetensors"))
    for folder, words in ((missing, ["missing", "blocks.3.attn.qkv.weight"]), (extra, ["unexpected", "head.weight"])):
        with pytest.raises(InputError) as raised:
            load_model(spec_for(folder), "cpu")
        assert all(word in str(raised.value) for word in words)
        [(severity, error)] = backend_named("timm").check(spec_for(folder))
        assert severity == "error" and all(word in str(error) for word in words)


class NotAStateDict:
    """A pickled object: unpickling it would import and run this module's code."""


def test_pickles_that_are_not_a_state_dict_are_refused(tiny_folder, tmp_path):
    objects = copy_folder(tiny_folder, tmp_path / "objects")
    torch.save({"model": NotAStateDict()}, objects / "pytorch_model.bin")
    with pytest.raises(InputError, match="refused because unpickling it could run arbitrary code"):
        load_model(spec_for(objects), "cpu")
    [(_, error)] = backend_named("timm").check(spec_for(objects))
    assert "refused" in str(error)

    tensors_list = copy_folder(tiny_folder, tmp_path / "list")
    torch.save([torch.zeros(3)], tensors_list / "pytorch_model.bin")  # loads with weights_only, but no names
    with pytest.raises(InputError, match="not a state dict"):
        load_model(spec_for(tensors_list), "cpu")


def test_a_pytorch_model_bin_state_dict_loads(tiny_folder, tiny_loaded, tmp_path):
    """UNI ships pytorch_model.bin: a plain state dict, read with weights_only."""
    from safetensors.torch import load_file

    folder = copy_folder(tiny_folder, tmp_path / "bin")
    torch.save(load_file(str(tiny_folder / "model.safetensors")), folder / "pytorch_model.bin")
    assert same_weights(load_model(spec_for(folder), "cpu").model, tiny_loaded.model)


def test_unknown_architecture_and_missing_files(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "unknown")
    (folder / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "vit_nonexistent_patch16_224"}))
    with pytest.raises(InputError, match="'vit_nonexistent_patch16_224'.*not an architecture timm"):
        load_model(spec_for(folder), "cpu")
    [(_, error)] = backend_named("timm").check(spec_for(folder))
    assert "not an architecture timm" in str(error)

    no_weights = copy_folder(tiny_folder, tmp_path / "no-weights")
    with pytest.raises(InputError, match="no weights"):
        load_model(spec_for(no_weights), "cpu")
    with pytest.raises(InputError, match="does not exist"):
        load_model(spec_for(tmp_path / "nowhere"), "cpu")


def test_prompts_on_an_image_only_model_say_it_has_no_text_tower(tiny_loaded):
    loaded = tiny_loaded
    with pytest.raises(InputError, match="has no text tower"):
        loaded.encode_texts(["tumour"])
    with pytest.raises(InputError, match="has no text tower"):
        _ = loaded.logit_scale


def test_hf_hub_form_reads_the_cache_offline(tiny_folder, tiny_loaded, tmp_path, monkeypatch):
    """hf-hub:MahmoodLab/UNI from a Hugging Face cache laid out by hand, with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--MahmoodLab--UNI"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((tiny_folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    spec = spec_for("hf-hub:MahmoodLab/UNI")
    assert backend_named("timm").check(spec) == []
    loaded = load_model(spec, "cpu")
    assert same_weights(loaded.model, tiny_loaded.model)
    assert loaded.weights == str(snapshot / "model.safetensors")

    missing = spec_for("hf-hub:MahmoodLab/UNI2-h")
    [(_, error)] = backend_named("timm").check(missing)
    assert "no config.json" in str(error) and "huggingface-cli download" in str(error)
