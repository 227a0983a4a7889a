"""SORSARegularizer (plain loops) and SORSACallback (transformers.Trainer)."""
import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk


def small_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))
    sk.apply_sorsa(m, ["0", "2"], r=4)
    with torch.no_grad():  # move away from orthonormal so the regularizer is non-trivial
        for p in sk.sorsa_parameters(m):
            p.add_(0.05 * torch.randn_like(p))
    sk.mark_only_sorsa_trainable(m)
    return m


def test_regularizer_helper_equals_manual_call_and_reads_optimizer_lr():
    m1, m2 = small_model(), small_model()
    opt = torch.optim.SGD(sk.sorsa_parameters(m1), lr=0.1)
    reg = sk.SORSARegularizer(m1, gamma=0.01, lr=opt)
    v1 = reg.step()
    v2 = sk.orthonormal_grad_(m2, 0.01, 0.1)
    assert v1 == pytest.approx(v2) and reg.last_value == v1
    for p, q in zip(sk.sorsa_parameters(m1), sk.sorsa_parameters(m2)):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    opt.param_groups[0]["lr"] = 0.0
    assert reg.step() is None  # lr 0 (warm-up start): skipped
    assert sk.SORSARegularizer(small_model(), 0.01, lambda: 0.5).step() == pytest.approx(v1)


def test_regularizer_helper_bad_input():
    with pytest.raises(ValueError, match="no sorsa_A / sorsa_B"):
        sk.SORSARegularizer(nn.Linear(3, 3), 0.1, 0.1)
    with pytest.raises(TypeError, match="lr must be a float"):
        sk.SORSARegularizer(small_model(), 0.1, "fast")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sk.SORSARegularizer([1], 0.1, 0.1)


class LossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_model()

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(12, generator=g), "labels": torch.randn(6, generator=g)}


def test_trainer_callback_applies_regularizer_before_optimizer_step(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers comes with the [test] extra (via sorsa)")
    model = LossModel()
    cb = sk.SORSACallback(gamma=0.05)
    seen = []

    class Spy(transformers.TrainerCallback):  # runs after ours: sees grads that include the regularizer
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen.append(sk.calc_ortho(model).item())

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                                          logging_strategy="no", save_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), callbacks=[cb, Spy()])
    trainer.train()
    assert cb.last_value is not None and len(seen) == 3
    assert cb.last_value == pytest.approx(seen[-1], rel=1e-5)
