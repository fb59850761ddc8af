import torch

from edgeweave.checkpoint import ModelSpec, load_checkpoint
from edgeweave.data import load_dataset
from edgeweave.training import evaluate, fit
from edgeweave.training.loop import default_milestones, make_loader


def _setup():
    bundle = load_dataset("synthetic", input_size=8, in_channels=1, num_classes=4, samples=256, noise=0.5)
    spec = ModelSpec("small_cnn", 4, 1, (8, 8), {"width": 4})
    return bundle, spec


def test_fit_learns_and_saves_best(tmp_path):
    bundle, spec = _setup()
    model = spec.build()
    before = evaluate(model, make_loader(bundle.test, 64, False))
    r = fit(model, bundle, epochs=3, lr=0.05, batch_size=32, out_dir=tmp_path, spec=spec, progress=False)
    assert r.accuracy > max(before, 0.5)
    assert r.epochs == 3 and len(r.history) == 3
    loaded, _, extra = load_checkpoint(r.checkpoint)
    assert extra["val_accuracy"] == r.best_accuracy
    assert evaluate(loaded, make_loader(bundle.test, 64, False)) == r.accuracy


def test_resume_continues_where_it_stopped(tmp_path):
    bundle, spec = _setup()
    torch.manual_seed(0)
    full = spec.build()
    r_full = fit(full, bundle, epochs=3, lr=0.05, batch_size=32, seed=1, progress=False, milestones=[2])
    torch.manual_seed(0)
    part = spec.build()
    fit(part, bundle, epochs=2, lr=0.05, batch_size=32, seed=1, out_dir=tmp_path, spec=spec, progress=False, milestones=[2])
    resumed = spec.build()
    r_res = fit(resumed, bundle, epochs=3, lr=0.05, batch_size=32, seed=1, out_dir=tmp_path, spec=spec, resume=True,
                progress=False, milestones=[2])
    assert [h["epoch"] for h in r_res.history] == [1, 2, 3]
    # same seeds, same data order: the resumed run ends where the uninterrupted one did
    assert abs(r_res.history[-1]["loss"] - r_full.history[-1]["loss"]) < 1e-4


def test_custom_loss_and_frozen_params():
    bundle, spec = _setup()
    model = spec.build()
    frozen = {k: v.clone() for k, v in model.features.state_dict().items() if k.endswith("weight")}
    calls = []

    def loss_fn(m, x, y):
        calls.append(len(y))
        return torch.nn.functional.cross_entropy(m(x), y)

    fit(model, bundle, epochs=1, batch_size=64, loss_fn=loss_fn, params=model.classifier.parameters(), progress=False)
    assert sum(calls) == len(bundle.train)
    for k, v in model.features.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k])


def test_default_milestones():
    assert default_milestones(400) == [200, 300]
    assert default_milestones(1) == []
