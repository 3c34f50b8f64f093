import numpy as np
import pytest

from vla_rl.models import ActionNormalizer, ActionTokenizer, build_prompt, default_norm_stats


def test_ids_are_the_last_256_of_llama():
    tok = ActionTokenizer()
    ids = tok.encode(np.linspace(-1, 1, 7 * 400).reshape(400, 7))
    assert ids.min() == 31744 and ids.max() == 31999
    # -1 falls in the first bin (bin 1 -> id 31999); +1 is the top edge (bin 256 -> id 31744).
    assert tok.encode(np.full(7, -1.0)).tolist() == [31999] * 7
    assert tok.encode(np.full(7, 1.0)).tolist() == [31744] * 7


def test_round_trip_within_half_a_bin():
    tok = ActionTokenizer()
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, size=(5000, 7))
    a[:7, :] = np.eye(7) * 2 - 1  # include both edges
    back = tok.decode(tok.encode(a))
    assert np.all(np.abs(back - a) <= tok.bin_width / 2 + 1e-12)


def test_out_of_range_actions_are_clipped():
    tok = ActionTokenizer()
    assert tok.encode(np.full(7, 5.0)).tolist() == tok.encode(np.full(7, 1.0)).tolist()


@pytest.mark.parametrize("bad", [np.full(7, np.nan), np.array([0, 0, 0, 0, 0, 0, np.inf])])
def test_non_finite_actions_are_an_error(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        ActionTokenizer().encode(bad)


def test_wrong_action_dimension_is_an_error():
    with pytest.raises(ValueError, match="last dimension 7"):
        ActionTokenizer().encode(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="last dimension 7"):
        ActionTokenizer().decode(np.full((2, 8), 31800))


def test_decode_rejects_non_action_ids():
    with pytest.raises(ValueError, match="outside the action range"):
        ActionTokenizer().decode(np.array([31743] * 7))


def test_unnormalize_with_mask_passes_the_gripper_through():
    stats = {
        "bridge": {
            "action": {
                "q01": [-0.1, -0.2, -0.3, -1.0, -1.0, -1.0, 0.0],
                "q99": [0.1, 0.2, 0.3, 1.0, 1.0, 1.0, 1.0],
                "mask": [True] * 6 + [False],
            }
        }
    }
    norm = ActionNormalizer.from_norm_stats(stats, "bridge")
    out = norm.unnormalize(np.array([1.0, -1.0, 0.0, 0.5, 0.0, 0.0, -0.7]))
    np.testing.assert_allclose(out, [0.1, -0.2, 0.0, 0.5, 0.0, 0.0, -0.7])
    np.testing.assert_allclose(norm.normalize(out), [1.0, -1.0, 0.0, 0.5, 0.0, 0.0, -0.7])


def test_unnorm_key_errors_name_the_choices():
    stats = default_norm_stats("a") | default_norm_stats("b")
    with pytest.raises(ValueError, match=r"unnorm_key is required.*\['a', 'b'\]"):
        ActionNormalizer.from_norm_stats(stats, None)
    with pytest.raises(ValueError, match="'c' not in norm_stats"):
        ActionNormalizer.from_norm_stats(stats, "c")
    assert ActionNormalizer.from_norm_stats(default_norm_stats("a"), None).mask[-1] == False  # noqa: E712


def test_prompt_matches_openvla():
    assert (
        build_prompt("Pick up the Red Cube")
        == "In: What action should the robot take to pick up the red cube?\nOut:"
    )
    with pytest.raises(ValueError, match="non-empty"):
        build_prompt("   ")
