"""What every method shares (methods/base.py): the linear warm-up's length and factor."""

import KD_engine
from methods import base


def test_warmup_steps_keep_the_papers_share_of_all_steps():
    assert base.warmup_steps(240, 10) == 200  # the paper: 20 of 240 epochs
    assert base.warmup_steps(3, 40) == 10  # a 3-epoch run warms up over its first 10 steps
    assert base.warmup_steps(1, 2) == 1
    assert base.warmup_steps(3, 40, warmup_epochs=2) == 80
    assert base.warmup_steps(3, 40, warmup_epochs=0) == 0


def test_every_method_that_needs_three_classes_says_why_and_the_others_take_two():
    for name in KD_engine.method_names():
        method = KD_engine.method_class(name)
        assert not method.check_classes(3)
        refusal = method.check_classes(2)
        assert bool(refusal) == (name in {"dkd", "dkd_ls", "dist", "dist_ls"}), name
        assert all(name in sentence and method.few_classes in sentence for sentence in refusal)
