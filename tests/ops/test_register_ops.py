"""graphred::register_layout: schema, fake kernel and eager kernel agree (opcheck); layouts by hand."""
import pytest
import torch

import graphred.ops as gops


@pytest.mark.parametrize("codes,n,images,img", [
    ([[0, 1, 1, 0]], 2, 1, 2),
    ([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1, 1, 1]], 3, 2, 5),
])
def test_opcheck(codes, n, images, img):
    torch.library.opcheck(torch.ops.graphred.register_layout.default,
                          (torch.tensor(codes, dtype=torch.int8), n, images, img))


def test_layout_by_hand_and_bad_input():
    codes = torch.tensor([[1, 1, 0, 0]], dtype=torch.int8)  # the image first
    src, orig, is_reg, keep = gops.register_layout(codes, 1, 1, 2)
    assert src.tolist() == [[0, 1, 4, 2, 3]] and orig.tolist() == [[0, 1, 1, 2, 3]]
    assert is_reg.tolist() == [[False, False, True, False, False]] and keep.tolist() == [[2, 3, 4]]
    with pytest.raises(ValueError, match="must hold 2 image"):
        gops.register_layout(codes, 1, 2, 2)
    with pytest.raises(ValueError, match="registers must be >= 1"):
        gops.register_layout(codes, 0, 1, 2)


def test_gather_backward_reaches_inserted_rows():
    """The insertion is a gather from [x, registers]: gradients reach every register row once per image."""
    codes = torch.tensor([[0, 1, 1, 0, 1, 0]], dtype=torch.int8)
    src, _, _, _ = gops.register_layout(codes, 2, 2, 3)
    x = torch.randn(1, 6, 4)
    reg = torch.randn(2, 4, requires_grad=True)
    y = gops.gather_tokens(torch.cat([x, reg.unsqueeze(0)], 1), src, 1)
    y.sum().backward()
    torch.testing.assert_close(reg.grad, torch.full((2, 4), 2.0))
