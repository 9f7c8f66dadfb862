"""`qlora-pipeline reproduce`: what it says when outputs move. A recorded run recomputed from
nothing, bitwise, is tested on a sweep point (tests/test_sweep.py)."""

from __future__ import annotations

from qlora_pipeline.tracking.reproduce import environment_changes, output_hashes, score_moves


def test_what_moved_is_said_against_the_noise_floor():
    lock = "stages:\n  a:\n    outs:\n    - path: x\n      md5: 1\n    - path: y\n      md5: 2\n"
    assert output_hashes(lock) == {"x": "1", "y": "2"}
    assert environment_changes(
        {"cpu": "AMD", "torch": "2.13"}, {"cpu": "Intel", "torch": "2.13"}
    ) == ["cpu: AMD -> Intel"]
    moves = score_moves(
        {"t": {"qlora": 0.60, "lora": 0.62, "gap": -0.02, "noise_floor": 0.10}},
        {"t": {"qlora": 0.65, "lora": 0.62, "gap": 0.03, "noise_floor": 0.12}},
    )
    assert moves[0] == "t qlora: 0.6000 -> 0.6500 (+0.0500, 0.50x the noise floor 0.100)"
    assert moves[2].startswith("t gap: -0.0200 -> 0.0300 (+0.0500, 0.50x")
