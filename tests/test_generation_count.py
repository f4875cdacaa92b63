"""What the generation loop reports about the tokens it generated."""

from __future__ import annotations


def test_new_token_count_stops_at_each_rows_first_eos() -> None:
    import torch

    from medreason.evaluation.generation import new_token_count

    new = torch.tensor([[5, 6, 2, 2, 2],   # EOS (2) third: 3 tokens, the pads after it not counted
                        [5, 6, 7, 8, 9],   # no EOS: all 5
                        [3, 2, 2, 2, 2]])  # the other EOS id first: 1 token
    assert new_token_count(new, [2, 3]) == 3 + 5 + 1
    assert new_token_count(new[:, :0], [2]) == 0
