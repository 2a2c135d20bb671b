"""Gate scaling: every gate's tanh(alpha) times lambda, from the base model (0) to the trained one (1)."""

import pytest
import torch

from react_vl.experiment import CONTROL_TOLERANCE, choose_gate_scale
from react_vl.gated import gate_values, inject_gated_blocks, scale_gates
from react_vl.models import load_model, save_model


def open_gates(model, seed=0):
    """Gated blocks with open gates (as training leaves them), so the gated model differs from the base."""
    inject_gated_blocks(model, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".gated_attn_block.alpha" in name:
                param.fill_(0.5 + torch.rand((), generator=generator).item())
    return model


@pytest.fixture(scope="module")
def base_and_gated(tmp_path_factory):
    """A mini-vit-test base checkpoint and the same weights plus open gated blocks, saved and loaded back."""
    folder = tmp_path_factory.mktemp("gate_scale")
    torch.manual_seed(0)
    model, _, _ = load_model("mini-vit-test")
    save_model(folder / "base.pt", model, "mini-vit-test")
    save_model(folder / "gated.pt", open_gates(model), "mini-vit-test")
    return folder / "base.pt", folder / "gated.pt"


@torch.inference_mode()
def test_lambda_zero_is_the_base_and_lambda_one_the_trained_model(base_and_gated):
    base, _, _ = load_model(None, str(base_and_gated[0]))
    gated, _, _ = load_model(None, str(base_and_gated[1]))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    trained = gated.encode_image(images)
    assert not torch.allclose(trained, base.encode_image(images), atol=1e-3)  # the gates do change the output
    with scale_gates(gated, 0.0):
        assert torch.equal(gated.encode_image(images), base.encode_image(images))
    with scale_gates(gated, 1.0):
        assert torch.equal(gated.encode_image(images), trained)
    with scale_gates(gated, 0.5):
        halfway = gated.encode_image(images)
    assert not torch.allclose(halfway, trained, atol=1e-4) and not torch.allclose(halfway, base.encode_image(images),
                                                                                 atol=1e-4)
    assert torch.equal(gated.encode_image(images), trained)  # the scale is undone on leaving the block
    assert set(gated.state_dict()) == set(torch.load(base_and_gated[1])["state_dict"])  # nothing new is saved
    assert all(value["attn"] > 0.4 for value in gate_values(gated).values())  # the weights are untouched


def test_gate_scale_needs_gated_blocks_and_a_lambda_in_0_1(base_and_gated):
    base, _, _ = load_model(None, str(base_and_gated[0]))
    gated, _, _ = load_model(None, str(base_and_gated[1]))
    with pytest.raises(ValueError, match=r"gate scale must be in \[0, 1\].*got 1.5"), scale_gates(gated, 1.5):
        pass
    with pytest.raises(ValueError, match="needs a model with gated blocks"), scale_gates(base, 0.5):
        pass


ROLES = {"sketch": "target", "night": "target", "photo": "control", "pixel": "control"}
BASE = {"sketch": 40.0, "night": 50.0, "photo": 90.0, "pixel": 60.0}


def test_choose_gate_scale_takes_the_largest_target_gain_that_keeps_the_controls():
    curve = {0.0: BASE,
             0.5: {"sketch": 46.0, "night": 54.0, "photo": 89.0, "pixel": 59.5},  # gain +5, controls -1
             1.0: {"sketch": 50.0, "night": 60.0, "photo": 85.0, "pixel": 60.0}}  # gain +10, photo -5
    choice = choose_gate_scale(curve, BASE, ROLES)
    assert choice["chosen"] == 0.5
    assert [(c["gate_scale"], c["target_change"], c["worst_control_change"]) for c in choice["candidates"]] == \
        [(0.0, 0.0, 0.0), (0.5, 5.0, -1.0), (1.0, 10.0, -5.0)]
    # with the controls kept everywhere, the largest gain wins; of equal gains, the smaller lambda
    kept = {**curve, 1.0: {**curve[1.0], "photo": 90.0 - CONTROL_TOLERANCE}}
    assert choose_gate_scale(kept, BASE, ROLES)["chosen"] == 1.0
    tied = {0.25: curve[0.5], 0.5: curve[0.5]}
    assert choose_gate_scale(tied, BASE, ROLES)["chosen"] == 0.25
    # every lambda loses a control: none is chosen
    assert choose_gate_scale({1.0: curve[1.0]}, BASE, ROLES)["chosen"] is None
    with pytest.raises(ValueError, match="needs target tasks"):
        choose_gate_scale(curve, BASE, {"photo": "control"})
