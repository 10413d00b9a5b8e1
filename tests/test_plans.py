"""Plans: validation at construction, text form, composition, layer selectors."""
import pytest

from graphred.plans import FastVStep, Plan, PumerStep, ToMeStep, fastv, parse_plan, prune, pumer, select_layers, tome


@pytest.mark.parametrize("make", [
    lambda: pumer(prune=1.0), lambda: pumer(prune=-0.1), lambda: pumer(merge=0.6), lambda: pumer(merge_text=0.51),
    lambda: pumer(prune="0.3"), lambda: pumer(layers=[-1]), lambda: pumer(layers="sometimes"),
    lambda: pumer(prune=[0.1, 0.2]), lambda: fastv(layer=0), lambda: fastv(keep=0.0), lambda: fastv(keep=1.5),
    lambda: tome(r=-1), lambda: tome(r=2.5), lambda: prune(scorer="magic"), lambda: prune(ratio=1.0),
])
def test_bad_values_raise_valueerror_at_construction(make):
    with pytest.raises(ValueError):
        make()


def test_text_form_roundtrip_and_composition():
    for text in ["pumer:prune=0.3,merge=0.2", "fastv:layer=2,keep=0.25", "tome:r=8",
                 "pumer:prune=0.1/0.2/0.3,merge=0,layers=2/5/8", "prune:ratio=0.5,scorer=norm,layers=2",
                 "pumer:prune=0.3,merge=0.2 + tome:r=4", "fastv:layer=2,keep=0.25,renumber=true",
                 "tome:r=4,proportional=false", "pumer:prune=0.3,merge=0.2,proportional=true"]:
        assert str(parse_plan(text)) == text
    plan = pumer(prune=0.3) + fastv(layer=2) + tome(r=4)
    assert [type(s) for s in plan] == [PumerStep, FastVStep, ToMeStep]
    assert isinstance(plan, Plan) and len(plan) == 3


def test_identity_detection():
    assert pumer(prune=0, merge=0).is_identity and fastv(keep=1.0).is_identity and tome(r=0).is_identity
    assert not pumer(prune=0.1).is_identity


@pytest.mark.parametrize("text", ["", "foo:x=1", "pumer:prune", "pumer:prune=abc", "fastv:lyr=2"])
def test_bad_text_plans(text):
    with pytest.raises(ValueError):
        parse_plan(text)


def test_layer_selectors():
    assert select_layers(None, [0, 1, 2, 3]) == [0, 1, 2, 3]
    assert select_layers("from:2", [0, 1, 2, 3]) == [2, 3]
    assert select_layers("every:2", [1, 2, 3, 4, 5]) == [1, 3, 5]
    assert select_layers(slice(1, 3), [0, 1, 2, 3]) == [1, 2]
    assert select_layers((1, 3), [0, 1, 2, 3]) == [1, 3]
    assert pumer(layers=[5, 2]).steps[0].layers == (2, 5)


def test_repeated_key_in_text_plan_is_refused():
    with pytest.raises(ValueError, match="layer given twice"):
        parse_plan("fastv:layer=1,layer=2")
    with pytest.raises(ValueError, match="prune given twice"):
        parse_plan("tome:r=2 + pumer:prune=0.1,merge=0,prune=0.2")
    assert str(parse_plan("fastv:layer=1 + fastv:layer=2")) == "fastv:layer=1,keep=0.5 + fastv:layer=2,keep=0.5"
