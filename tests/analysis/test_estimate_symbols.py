"""Estimate what-ifs accept symbol names, the estimate's symbols and plain sympy symbols alike."""
import pytest
import sympy


def test_flops_with_matches_plain_sympy_symbols_by_name(zoo_program):
    import graphred

    est = graphred.estimate(zoo_program("llava"))
    own = est.symbol("n_img")
    plain = sympy.Symbol("n_img")  # no assumptions: a different sympy object from the estimate's
    assert plain != own and est.symbol(plain) is own
    ref = est.flops_with({own: own / 2}, start=1)
    assert ref.subs(est.symbols) < est.flops  # the what-if changes something
    for key, value in [(plain, plain / 2), ("n_img", own / 2), (plain, own / 2), (own, plain / 2)]:
        got = est.flops_with({key: value}, start=1)
        assert sympy.simplify(got - ref) == 0, (key, value)
        assert plain not in got.free_symbols
    with pytest.raises(KeyError, match="n_imgs"):
        est.flops_with({sympy.Symbol("n_imgs"): 1})
    assert est.evaluate("flops", n_img=32) == int(est.flops_expr.subs({**est.symbols, own: 32}))
