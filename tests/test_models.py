import pytest
import torch

from react_vl.gated import gate_values, gated_layers_in_state_dict, inject_gated_blocks
from react_vl.models import load_model, save_model


def _features(model, images, text):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def test_tiny_config_builds_by_name():
    model, preprocess, tokenizer = load_model("mini-vit-test")
    assert model.visual.image_size == (32, 32)
    assert tokenizer(["a photo of a circle"]).shape == (1, 32)
    assert model.react_vl["gated_layers"] == []


def test_gated_injection_is_identity_at_init():
    torch.manual_seed(0)
    model, _, tokenizer = load_model("mini-vit")
    images, text = torch.randn(4, 3, 64, 64), tokenizer(["a red circle", "a sketch of a star"])
    before = _features(model, images, text)
    layers = inject_gated_blocks(model)
    assert layers == [3, 4, 5]  # half of a 6-layer tower
    after = _features(model, images, text)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # opening a gate changes the image features, never the text features
    model.visual.transformer.resblocks[5].gated_attn_block.alpha_attn.data.fill_(1.0)
    opened = _features(model, images, text)
    assert not torch.allclose(opened[0], before[0]) and torch.equal(opened[1], before[1])
    assert gate_values(model)[5]["attn"] == pytest.approx(torch.tanh(torch.tensor(1.0)).item())


def test_released_key_names_load_strictly(tmp_path):
    model, _, _ = load_model("mini-vit-test")
    inject_gated_blocks(model, 1)
    keys = [k for k in model.state_dict() if "gated_attn_block" in k]
    expected = {"alpha_attn", "alpha_dense", "ln_1.weight", "ln_1.bias", "attn.in_proj_weight",
                "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight",
                "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"}
    assert {k.split("gated_attn_block.")[1] for k in keys} == expected
    assert all(k.startswith("visual.transformer.resblocks.1.gated_attn_block.") for k in keys)
    # a plain state dict with those keys (as in a released REACT checkpoint) loads by path
    state_dict = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state_dict["module.visual.transformer.resblocks.1.gated_attn_block.alpha_dense"].fill_(0.3)
    torch.save({"state_dict": state_dict, "epoch": 3}, tmp_path / "react_released.pt")
    loaded, _, _ = load_model("mini-vit-test", str(tmp_path / "react_released.pt"))
    assert loaded.react_vl["gated_layers"] == [1]
    assert gate_values(loaded)[1]["dense"] == pytest.approx(torch.tanh(torch.tensor(0.3)).item())
    assert gated_layers_in_state_dict(state_dict) == [1]


def test_react_vl_checkpoint_roundtrip_records_model_name(tmp_path):
    torch.manual_seed(1)
    model, _, tokenizer = load_model("mini-vit-test")
    inject_gated_blocks(model, [0, 1])
    model.visual.transformer.resblocks[0].gated_attn_block.alpha_attn.data.fill_(0.5)
    save_model(tmp_path / "model.pt", model, "mini-vit-test", strategy="gated-image")
    loaded, _, _ = load_model(None, str(tmp_path / "model.pt"))
    images, text = torch.randn(2, 3, 32, 32), tokenizer(["a star"])
    a, b = _features(model.eval(), images, text), _features(loaded, images, text)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_random_init_warning_only_when_the_weights_are_random(tmp_path, caplog):
    model, _, _ = load_model("mini-vit-test")
    assert "initialized randomly" in caplog.text  # open_clip's own warning, kept for random weights
    save_model(tmp_path / "model.pt", model, "mini-vit-test")
    caplog.clear()
    load_model(None, str(tmp_path / "model.pt"))
    assert "initialized randomly" not in caplog.text


def test_missing_checkpoint_and_unknown_tag_say_what_was_wanted(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model("mini-vit-test", str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="unknown pretrained tag 'no-such-tag'"):
        load_model("ViT-B-32", "no-such-tag")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("ViT-Nope", None)


def test_offline_pretrained_tag_names_tag_and_local_path_option(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine with no network
    with pytest.raises(RuntimeError, match=r"'ViT-B-32' / 'openai'.*--pretrained /path"):
        load_model("ViT-B-32", "openai")


def test_gated_blocks_refused_on_a_resnet_tower():
    model, _, _ = load_model("RN50")
    with pytest.raises(TypeError, match="VisionTransformer"):
        inject_gated_blocks(model)
