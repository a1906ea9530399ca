"""Input-side MOSE (W ← W Q): the plane rotation, the aimed plane, the reachable-target projections, and the
method end to end on a tiny model (undo, atomicity, spectrum, protection of earlier keys)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import REQUESTS, build_tiny_model, snapshot, target_logprob, tiny_hparams

import mose_easyedit as me
from mose_easyedit.input_rotation import (Reader, aimed_null_plane, aimed_plane, low_variance_direction, minus_span,
                                          orthonormal_columns, plane_rotate, plane_rotation_matrix, project_to_reach,
                                          project_to_spheres)
from mose_easyedit.methods.mose import MOSEHyperParams, apply_mose_to_model
from mose_easyedit.methods.mose_input import MOSEInputHyperParams, apply_mose_input_to_model
from mose_easyedit.editor import LayerBatch, Operands
from mose_easyedit.methods.mose_input_procrustes import (MOSEInputProcrustesHyperParams,
                                                         apply_mose_input_procrustes_to_model, key_procrustes_rule,
                                                         target_keys)
from mose_easyedit.methods.mose_shared import MOSEState, undo_mose_edits
from mose_easyedit.modeling import read_weight
from mose_easyedit.session import get_session


def _problem(d=6, p=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, p, generator=g, dtype=torch.float64)
    k = torch.randn(p, generator=g, dtype=torch.float64)
    return W, k, g


def _null_w_subspaces(W, k):
    gram = W @ W.T

    def null(x):
        return x - W.T @ torch.linalg.solve(gram, W @ x)

    a = null(k)
    a = a / a.norm()
    return a, minus_span(lambda x: x, a[:, None])


def test_plane_rotation_rank_two_form_equals_the_explicit_product_and_keeps_every_singular_value():
    W, k, g = _problem()
    a = torch.randn(16, generator=g, dtype=torch.float64)
    a = a / a.norm()
    b = torch.randn(16, generator=g, dtype=torch.float64)
    b = b - (a @ b) * a
    b = b / b.norm()
    for t in (0.3, 1.2, -2.5, math.pi):
        Q = plane_rotation_matrix(a, b, t)
        torch.testing.assert_close(Q.T @ Q, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)
        rotated = plane_rotate(W, a, b, t)
        torch.testing.assert_close(rotated, W @ Q, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.linalg.svdvals(rotated), torch.linalg.svdvals(W), rtol=1e-9, atol=0)
        # turned back exactly
        torch.testing.assert_close(plane_rotate(rotated, a, b, -t), W, rtol=0, atol=1e-12)


def test_aimed_plane_meets_a_reachable_request_exactly_with_the_smallest_angle():
    W, k, g = _problem()
    a, reading = _null_w_subspaces(W, k)
    alpha = float(a @ k)
    direction = torch.randn(6, generator=g, dtype=torch.float64)
    reach = float(torch.linalg.pinv(W) @ direction @ (torch.linalg.pinv(W) @ direction)) ** 0.5
    r = direction * (0.5 * alpha / reach)  # half of what a quarter turn can deliver
    plane = aimed_null_plane(W, k, r, a, reading)
    assert plane.reachable
    new = plane_rotate(W, plane.a, plane.b, plane.t)
    torch.testing.assert_close(new @ k - W @ k, r, rtol=0, atol=1e-6 * float(r.norm()))
    assert plane.fit_error < 1e-6 and abs(float(plane.a @ plane.b)) < 1e-12
    # the smallest exact angle: below the angle of the largest progress, atan2(α, β)
    assert 0 < plane.t < math.atan2(plane.alpha, float(plane.b @ k))


def test_aimed_plane_with_a_reading_orthogonal_to_the_key_meets_a_reachable_request_exactly():
    W, k, g = _problem(p=20, seed=5)
    basis = orthonormal_columns(torch.randn(20, 12, generator=g, dtype=torch.float64))
    a = basis @ (basis.T @ k)
    a = a / a.norm()
    reading = minus_span(lambda x: basis @ (basis.T @ x), a[:, None])
    r = 0.02 * torch.randn(6, generator=g, dtype=torch.float64) * float((W @ k).norm())
    plane = aimed_plane(W, k, r, a, reading)
    assert plane.reachable and plane.fit_error < 1e-6
    new = plane_rotate(W, plane.a, plane.b, plane.t)
    torch.testing.assert_close(new @ k - W @ k, r, rtol=0, atol=1e-6 * float(r.norm()))
    assert abs(float(plane.b @ k)) < 1e-9
    # the smallest exact angle over every allowed plane: at angle t, r is met by some unit b in the reading
    # subspace iff the least-norm solution of W b = (r/α + (1 − cos t) W a) / sin t there has norm ≤ 1
    B = orthonormal_columns(reading(torch.eye(20, dtype=torch.float64)))
    alpha = float(a @ k)

    def least_norm(t):
        wanted = (r / alpha + (1 - math.cos(t)) * (W @ a)) / math.sin(t)
        return float((torch.linalg.pinv(W @ B) @ wanted).norm())

    assert 0 < plane.t < math.pi / 2
    assert least_norm(plane.t) == pytest.approx(1.0, abs=1e-6)
    assert least_norm(0.98 * plane.t) > 1.0 + 1e-4


def test_aimed_plane_out_of_reach_moves_partway_and_never_away():
    W, k, g = _problem(seed=1)
    a, reading = _null_w_subspaces(W, k)
    r = 50.0 * torch.randn(6, generator=g, dtype=torch.float64) * float((W @ k).norm())
    plane = aimed_null_plane(W, k, r, a, reading)
    assert not plane.reachable
    new = plane_rotate(W, plane.a, plane.b, plane.t)
    error = float((new @ k - W @ k - r).norm() / r.norm())
    assert error == pytest.approx(plane.fit_error, rel=1e-9)
    assert 0.0 < error < 1.0
    assert aimed_null_plane(W, k, torch.zeros(6, dtype=torch.float64), a, reading) is None


def test_null_c_plane_keeps_keys_outside_its_subspace_exactly():
    W, k, g = _problem(p=20, seed=2)
    basis = orthonormal_columns(torch.randn(20, 10, generator=g, dtype=torch.float64))

    def P(x):
        return basis @ (basis.T @ x)

    protected = torch.randn(20, 3, generator=g, dtype=torch.float64)
    shield = orthonormal_columns(P(protected))
    allowed = minus_span(P, shield)
    a = allowed(k)
    a = a / a.norm()
    reading = minus_span(P, orthonormal_columns(torch.cat([shield, a[:, None]], dim=1)))
    r = 0.05 * torch.randn(6, generator=g, dtype=torch.float64)
    plane = aimed_plane(W, k, r, a, reading)
    new = plane_rotate(W, plane.a, plane.b, plane.t)
    outside = torch.randn(20, 4, generator=g, dtype=torch.float64)
    outside = outside - basis @ (basis.T @ outside)
    torch.testing.assert_close(new @ outside, W @ outside, rtol=0, atol=1e-10)
    torch.testing.assert_close(new @ protected, W @ protected, rtol=0, atol=1e-10)
    assert plane.fit_error < 1.0


def test_low_variance_direction_trades_reach_for_less_generic_variance():
    W, k, g = _problem(p=24, seed=6)
    mix = torch.randn(24, 24, generator=g, dtype=torch.float64)
    C = mix @ torch.diag(torch.logspace(-3, 1, 24, dtype=torch.float64)) @ mix.T / 24
    gram = W @ W.T
    null_part = k - W.T @ torch.linalg.solve(gram, W @ k)
    shield = orthonormal_columns((lambda x: x - W.T @ torch.linalg.solve(gram, W @ x))(
        torch.randn(24, 2, generator=g, dtype=torch.float64)))

    def ratio(a):
        return float(a @ C @ a) / float(a @ k) ** 2

    plain = null_part - shield @ (shield.T @ null_part)
    previous = None
    for ridge in (1e3, 1.0, 1e-2):
        a = low_variance_direction(W, k, C, shield, ridge)
        assert float((W @ a).norm()) < 1e-10 and float((shield.T @ a).norm()) < 1e-10  # in null(W) ⊥ shield
        assert float(a.norm()) == pytest.approx(float(a @ k) / float(a.norm()), rel=1e-9)  # ‖a‖ = âᵀk
        if previous is not None:
            assert ratio(a) < ratio(previous) and float(a.norm()) < float(previous.norm())
        previous = a
    torch.testing.assert_close(low_variance_direction(W, k, C, shield, 1e8), plain, rtol=1e-5, atol=1e-8)


def test_projection_onto_the_output_spheres_gives_shares_a_rotation_can_deliver():
    g = torch.Generator().manual_seed(3)
    outputs = [torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    delta = torch.randn(2, 8, generator=g, dtype=torch.float64)
    projected = project_to_spheres(delta, outputs, sweeps=200)
    share = projected.T / 3
    for u in outputs:
        torch.testing.assert_close((u + share).norm(dim=0), u.norm(dim=0), rtol=1e-4, atol=0)
    one = project_to_spheres(delta, outputs[:1], sweeps=1)
    torch.testing.assert_close((outputs[0] + one.T).norm(dim=0), outputs[0].norm(dim=0), rtol=1e-12, atol=0)


def test_projection_onto_capped_spheres_turns_no_output_further_than_the_cap():
    g = torch.Generator().manual_seed(5)
    outputs = [torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    delta = 3 * torch.randn(2, 8, generator=g, dtype=torch.float64)
    free = project_to_spheres(delta, outputs, sweeps=200)
    capped = project_to_spheres(delta, outputs, sweeps=200, max_angle=0.2)

    def angles(projected):
        share = projected.T / 3
        return torch.stack([torch.arccos(((u + share) * u).sum(0) / (u.norm(dim=0) ** 2)).clamp(max=math.pi)
                            for u in outputs])

    assert float(angles(free).max()) > 0.3  # the request is out of the cap
    assert float(angles(capped).max()) <= 0.2 + 1e-6
    for u in outputs:
        torch.testing.assert_close((u + capped.T / 3).norm(dim=0), u.norm(dim=0), rtol=1e-4, atol=0)
    small = 1e-3 * delta  # a request inside the cap is unchanged by it
    torch.testing.assert_close(project_to_spheres(small, outputs, max_angle=0.2), project_to_spheres(small, outputs))


def test_projection_onto_the_input_reach_keeps_reachable_targets_and_shrinks_the_others():
    W, k, g = _problem(seed=4)
    reader = Reader.build(W, lambda x: x)
    radii = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    inside = (W @ (0.2 * torch.randn(16, generator=g, dtype=torch.float64) / 4)).expand(2, -1).clone()
    x = torch.linalg.pinv(W) @ inside[0]
    inside = inside * (0.4 / float(x.norm()))
    torch.testing.assert_close(project_to_reach(inside, [reader], radii), inside, rtol=0, atol=1e-9)
    outside = inside * 10
    projected = project_to_reach(outside, [reader], radii)
    needed = torch.linalg.pinv(W) @ projected.T  # the minimum-norm key change behind each projected δ
    assert float(needed.norm(dim=0).max()) <= 0.5 * (1 + 1e-6)
    # the nearest point of the set: closer than the request scaled back onto its boundary
    radial = outside * (0.5 / float((torch.linalg.pinv(W) @ outside[0]).norm()))
    assert float((projected - outside).norm()) < float((radial - outside).norm())


@pytest.mark.parametrize("subspace,ridge", [("null_w", None), ("null_w", 1.0), ("null_c", None)])
def test_input_side_edit_keeps_spectrum_protects_earlier_keys_and_undoes_exactly(tokenizer, subspace, ridge):
    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEInputHyperParams, "llama", input_subspace=subspace, input_a_ridge=ridge,
                      layer_selection=False, layers=[1, 2], nullspace_threshold=1e3, v_lr=0.5,
                      protect_reading=True)
    original = snapshot(model)
    modules = [hp.rewrite_module_tmp.format(layer) for layer in (1, 2)]
    singular = {m: torch.linalg.svdvals(read_weight(model, m).double()) for m in modules}
    before = target_logprob(model, tokenizer, REQUESTS[0]["prompt"], "English")
    apply_mose_input_to_model(model, tokenizer, [REQUESTS[0]], hp)
    assert target_logprob(model, tokenizer, REQUESTS[0]["prompt"], "English") > before + 0.25
    entry = me.edit_history(model, "MOSE-input")[-1]
    for layer in (1, 2):
        diag = entry["per_layer"][layer]
        assert set(diag) >= {"rho", "fit_error", "angle", "alpha_over_k", "reachable"}
    after_first = snapshot(model)
    apply_mose_input_to_model(model, tokenizer, [REQUESTS[1]], hp)
    for m in modules:
        torch.testing.assert_close(torch.linalg.svdvals(read_weight(model, m).double()), singular[m],
                                   rtol=1e-5, atol=1e-6)
    session = get_session(model, "MOSE-input", create=False)
    keys = session.state.protected_keys
    for m in modules:  # the second edit's planes are ⊥ the first edit's keys: their outputs stay
        first_key = keys[m][:, :1].double()
        torch.testing.assert_close(read_weight(model, m).double() @ first_key,
                                   after_first[m + ".weight"].double() @ first_key, rtol=1e-4, atol=1e-5)
    undo_mose_edits(model, 2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, original[name], rtol=0, atol=1e-5)


def test_a_file_with_the_side_switch_loads_and_edits_as_mose_input(tokenizer):
    """The earlier form (alg_name MOSE, rotation_side: input) is MOSE-input: same hyperparameters, same edit."""
    legacy = MOSEHyperParams.from_hparams("smollm2-135m-input")
    assert isinstance(legacy, MOSEInputHyperParams) and legacy == MOSEInputHyperParams.from_hparams("smollm2-135m")
    hp = tiny_hparams(MOSEHyperParams, "llama", rotation_side="input", layer_selection=False, layers=[1, 2])
    assert isinstance(hp, MOSEInputHyperParams)
    first, second = build_tiny_model("llama", len(tokenizer)), build_tiny_model("llama", len(tokenizer))
    apply_mose_to_model(first, tokenizer, [REQUESTS[0]], hp)
    apply_mose_input_to_model(second, tokenizer, [REQUESTS[0]], hp)
    assert len(me.edit_history(first, "MOSE-input")) == 1
    for name, value in second.named_parameters():
        assert torch.equal(first.get_parameter(name), value), name


def test_new_options_are_checked_by_name(tokenizer):
    with pytest.raises(ValueError, match="rotation_side"):
        tiny_hparams(MOSEHyperParams, "llama", rotation_side="left")
    for key, value in (("input_subspace", "null"), ("input_spread", "all"), ("target_reach", "yes"),
                       ("input_a_ridge", -1.0)):
        with pytest.raises(ValueError, match=key):
            tiny_hparams(MOSEInputHyperParams, "llama", **{key: value})


def test_principal_keys_keep_the_leading_directions_of_the_earlier_keys():
    from mose_easyedit.methods.mose_input_budget import principal_keys

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
    keys = keys + 1e-6 * torch.randn(12, 9, generator=g, dtype=torch.float64)
    assert torch.equal(principal_keys(keys[:, :2], 3), keys[:, :2])  # fewer keys than the budget: all of them
    basis = orthonormal_columns(principal_keys(keys, 3))
    assert basis.shape[1] == 3
    outside = keys - basis @ (basis.T @ keys)  # rank-3 keys: three directions hold (almost) all their energy
    assert float(outside.norm()) < 1e-5 * float(keys.norm())


def test_budget_rule_with_room_for_every_earlier_key_edits_as_the_input_side(tokenizer):
    """With protect_rank at least the number of earlier keys, MOSE-input-budget protects exactly what MOSE-input
    protects (the same span): the same edits to rounding; with protect_rank 0 an earlier key's output moves."""
    from mose_easyedit.methods.mose_input_budget import MOSEInputBudgetHyperParams, apply_mose_input_budget_to_model

    common = dict(layer_selection=False, layers=[1, 2], nullspace_threshold=1e3, v_lr=0.5, protect_reading=True)
    reference = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEInputHyperParams, "llama", **common)
    for request in REQUESTS:
        apply_mose_input_to_model(reference, tokenizer, [request], hp)
    moved = {}
    for rank in (8, 0):
        model = build_tiny_model("llama", len(tokenizer))
        budget = tiny_hparams(MOSEInputBudgetHyperParams, "llama", protect_rank=rank, **common)
        apply_mose_input_budget_to_model(model, tokenizer, [REQUESTS[0]], budget)
        module = budget.rewrite_module_tmp.format(2)
        first_key = get_session(model, "MOSE-input-budget").state.protected_keys[module][:, :1].double()
        before = read_weight(model, module).double() @ first_key
        apply_mose_input_budget_to_model(model, tokenizer, [REQUESTS[1]], budget)
        moved[rank] = float((read_weight(model, module).double() @ first_key - before).norm() / before.norm())
        if rank == 8:
            for name, value in reference.named_parameters():
                torch.testing.assert_close(model.get_parameter(name), value, rtol=1e-5, atol=1e-6)
    assert moved[8] < 1e-5 < moved[0]


def test_room_of_a_layer_shrinks_with_the_directions_its_earlier_edits_took():
    from mose_easyedit.methods.mose_input_room import layer_room

    g = torch.Generator().manual_seed(5)
    K = torch.randn(10, 3, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64))[0]
    P = basis @ basis.T
    share = float(((P @ K).norm(dim=0) / K.norm(dim=0)).mean())
    assert layer_room(K, P, 4, 0) == pytest.approx(share, rel=1e-12)
    assert layer_room(K, P, 4, 3) == pytest.approx(share / 2, rel=1e-12)
    assert layer_room(K, P, 4, 4) == layer_room(K, P, 4, 9) == 0.0


def test_room_window_moves_to_the_layer_its_earlier_edits_left_freer(tokenizer):
    """Null space = everything (threshold 1e3): the room of a layer is sqrt((p − m)/p) with m its earlier edits, so
    single-layer windows over candidates 1 and 2 alternate 1, 2, 1; only the chosen layer is written, and each
    layer protects exactly the keys of the calls that edited it."""
    from mose_easyedit.methods.mose_input_room import MOSEInputRoomHyperParams, apply_mose_input_room_to_model

    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEInputRoomHyperParams, "llama", candidate_layers=[1, 2], neighbours=0,
                      nullspace_threshold=1e3, v_lr=0.5)
    chosen = []
    third = {"prompt": "Toko Yasuda plays the instrument", "subject": "Toko Yasuda", "target_new": "piano"}
    for request in [*REQUESTS[:2], third]:
        before = snapshot(model)
        apply_mose_input_room_to_model(model, tokenizer, [request], hp)
        record = me.edit_history(model, "MOSE-input-room")[-1]
        chosen.append(record["selected_layer"])
        changed = {name for name, value in model.named_parameters() if not torch.equal(value, before[name])}
        assert changed == {hp.rewrite_module_tmp.format(chosen[-1]) + ".weight"}
    assert chosen == [1, 2, 1]
    keys = get_session(model, "MOSE-input-room").state.protected_keys
    assert {module: value.shape[1] for module, value in keys.items()} == {
        hp.rewrite_module_tmp.format(1): 2, hp.rewrite_module_tmp.format(2): 1}
    with pytest.raises(ValueError, match="input_subspace"):
        tiny_hparams(MOSEInputRoomHyperParams, "llama", input_subspace="null_w")


def test_building_the_reach_projection_is_timed_as_its_own_stage(tokenizer, monkeypatch):
    """The time spent in the method's ``reach`` (the projection built once per call) is reported as "reach"."""
    import time

    from mose_easyedit.methods.mose_input import MOSE_INPUT_METHOD

    built = MOSE_INPUT_METHOD.reach

    def slow_reach(ctx, window):
        time.sleep(0.2)
        return built(ctx, window)

    monkeypatch.setattr(MOSE_INPUT_METHOD, "reach", slow_reach)
    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEInputHyperParams, "llama", layer_selection=False, layers=[1, 2], target_reach="rotation")
    apply_mose_input_to_model(model, tokenizer, [REQUESTS[0]], hp)
    seconds = me.edit_history(model, "MOSE-input")[-1]["seconds"]
    assert seconds["reach"] >= 0.2 and seconds["total"] >= seconds["reach"] + seconds["targets"]


def test_reach_and_rule_share_one_basis_of_the_protected_keys_per_layer(tokenizer, monkeypatch):
    """One call of one request on a 2-layer window with reachable targets orthogonalises twice per layer: the
    protected keys' basis once (the reach projection and the rule share it) and the reading subspace once (built
    only where it is used, in the rule); the edit is the same as without the sharing (the digests pin it)."""
    import mose_easyedit.input_rotation as input_rotation

    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEInputHyperParams, "llama", layer_selection=False, layers=[1, 2], input_subspace="null_c",
                      nullspace_threshold=1e3, target_reach="rotation")
    apply_mose_input_to_model(model, tokenizer, [REQUESTS[0]], hp)  # the second call has protected keys
    calls = []
    counted = input_rotation.orthonormal_columns

    def counting(X, *args, **kwargs):
        calls.append(X.shape[1])
        return counted(X, *args, **kwargs)

    monkeypatch.setattr(input_rotation, "orthonormal_columns", counting)
    apply_mose_input_to_model(model, tokenizer, [REQUESTS[1]], hp)
    assert sorted(calls) == [1, 1, 2, 2]  # per layer: the one earlier key, then it and the turning direction


# ------------------------------------------------------------------------ the key-space Procrustes (input side)
def _key_problem(d=6, p=16, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, p, generator=g, dtype=torch.float64)
    K = torch.randn(p, n, generator=g, dtype=torch.float64)
    scales = torch.linspace(2.0, 0.05, p, dtype=torch.float64)[:, None]
    X = torch.randn(p, 4 * p, generator=g, dtype=torch.float64) * scales
    return W, K, X @ X.T / X.shape[1], g


def test_target_keys_meet_the_request_at_the_key_norm_or_shrink_when_it_is_too_far():
    W, K, C, g = _key_problem()
    residual = 0.3 * (W @ K).norm(dim=0) * torch.randn(W.shape[0], K.shape[1], generator=g, dtype=torch.float64)
    residual = residual / residual.norm(dim=0)
    K_star, exact = target_keys(W, K, residual, C, ridge=1e-2)
    assert bool(exact.all())
    torch.testing.assert_close(W @ K_star, W @ K + residual)
    torch.testing.assert_close(K_star.norm(dim=0), K.norm(dim=0))
    far = 100 * (W @ K).norm(dim=0) * residual  # needs a key longer than ‖k‖ in W's row space
    K_far, exact_far = target_keys(W, K, far, C, ridge=1e-2)
    assert not bool(exact_far.any())
    torch.testing.assert_close(K_far.norm(dim=0), K.norm(dim=0))


def test_target_keys_move_where_generic_keys_have_little_energy_when_the_ridge_is_small():
    W, K, C, g = _key_problem(n=1)
    residual = 0.2 * (W @ K).norm() * torch.randn(W.shape[0], 1, generator=g, dtype=torch.float64)
    moves = {}
    for ridge in (1e-3, 1e3):
        K_star, _ = target_keys(W, K, residual, C, ridge)
        step = (K_star - K)[:, 0]
        moves[ridge] = float(step @ C @ step / (step @ step))
    assert moves[1e-3] < 0.5 * moves[1e3]


def test_key_procrustes_rule_delivers_keeps_the_spectrum_and_weighs_earlier_keys():
    W, K, C, g = _key_problem(n=1)
    earlier = torch.randn(W.shape[1], 3, generator=g, dtype=torch.float64)
    state = MOSEState(protected_keys={"m": earlier.float()})
    residual = 0.2 * (W @ K).norm() * torch.randn(W.shape[0], 1, generator=g, dtype=torch.float64)
    batch = LayerBatch(layer=0, module="m", W=W, K=K, K_bare=K, residual=residual, position=0, window=[0])
    moved = {}
    for gamma in (0.0, 100.0):
        hp = tiny_hparams(MOSEInputProcrustesHyperParams, "llama", mose_lambda=1e-3, protect_weight=gamma)
        update = key_procrustes_rule(batch, Operands(C=C), state, hp)
        torch.testing.assert_close(torch.linalg.svdvals(update.weight), torch.linalg.svdvals(W))
        moved[gamma] = float((update.weight @ earlier.float().double() - W @ earlier.float().double()).norm())
        if gamma == 0.0:
            assert update.diagnostics["fit_error"] < 1e-3
        step = update.state.pending["m"]
        torch.testing.assert_close(step.revert(update.weight), W, atol=1e-5, rtol=0)
        assert update.state.protected_keys["m"].shape[1] == 4
    assert moved[100.0] < 0.2 * moved[0.0]


def test_key_procrustes_edit_on_a_tiny_model_keeps_the_spectrum_and_undoes(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEInputProcrustesHyperParams, "llama", layer_selection=False, layers=[1, 2])
    original = snapshot(model)
    modules = [hp.rewrite_module_tmp.format(layer) for layer in (1, 2)]
    before = target_logprob(model, tokenizer, REQUESTS[0]["prompt"], "English")
    apply_mose_input_procrustes_to_model(model, tokenizer, [REQUESTS[0]], hp)
    apply_mose_input_procrustes_to_model(model, tokenizer, [REQUESTS[1]], hp)
    assert target_logprob(model, tokenizer, REQUESTS[0]["prompt"], "English") > before + 0.25
    entry = me.edit_history(model, "MOSE-input-procrustes")[-1]
    assert set(entry["per_layer"][1]) >= {"rho", "fit_error", "key_move", "rotation_distance", "reachable"}
    for m in modules:
        torch.testing.assert_close(torch.linalg.svdvals(read_weight(model, m).double()),
                                   torch.linalg.svdvals(original[m + ".weight"].double()), rtol=1e-5, atol=1e-6)
    assert undo_mose_edits(model, 2, method="MOSE-input-procrustes") == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, original[name], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="target_reach"):
        tiny_hparams(MOSEInputProcrustesHyperParams, "llama", target_reach="rotation")
