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
    assert float(v1) == pytest.approx(float(v2)) and reg.last_value is v1
    for p, q in zip(sk.sorsa_parameters(m1), sk.sorsa_parameters(m2)):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    opt.param_groups[0]["lr"] = 0.0
    assert reg.step() is None  # lr 0 (warm-up start): skipped
    assert float(sk.SORSARegularizer(small_model(), 0.01, lambda: 0.5).step()) == pytest.approx(float(v1))


def test_regularizer_helper_bad_input():
    with pytest.raises(ValueError, match="no sorsa_A / sorsa_B"):
        sk.SORSARegularizer(nn.Linear(3, 3), 0.1, 0.1)
    with pytest.raises(ValueError, match="lr must be a float, a callable, an optimizer or 'initial'"):
        sk.SORSARegularizer(small_model(), 0.1, "fast")
    with pytest.raises(TypeError, match="lr must be a float"):
        sk.SORSARegularizer(small_model(), 0.1, [0.1])
    with pytest.raises(ValueError, match="lr='initial' needs the optimizer"):
        sk.SORSARegularizer(small_model(), 0.1, "initial")
    with pytest.raises(ValueError, match="scaler= needs the optimizer"):
        sk.SORSARegularizer(small_model(), 0.1, 0.1, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sk.SORSARegularizer([1], 0.1, 0.1)


def test_lr_initial_reproduces_reference_gamma_over_lr0_under_a_schedule():
    """sorsa 1.0.1 divides by the initial lr for the whole run; lr='initial' does exactly
    that, the default (current lr) does not once the schedule has decayed."""
    m_init, m_cur, m_ref = small_model(), small_model(), small_model()
    lr0, gamma = 0.1, 0.01
    opts = [torch.optim.SGD(sk.sorsa_parameters(m), lr=lr0) for m in (m_init, m_cur)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    for o, sch in zip(opts, scheds):
        for _ in range(3):
            o.step()
            sch.step()
    assert opts[0].param_groups[0]["lr"] == pytest.approx(lr0 / 8)
    sk.SORSARegularizer(m_init, gamma, "initial", optimizer=opts[0]).step()
    sk.SORSARegularizer(m_cur, gamma, opts[1]).step()
    (gamma / lr0 * sk.calc_ortho(m_ref)).backward()  # the reference's coefficient
    for p, q, c in zip(sk.sorsa_parameters(m_init), sk.sorsa_parameters(m_ref), sk.sorsa_parameters(m_cur)):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6 * q.grad.abs().max().item())
            torch.testing.assert_close(c.grad, 8 * q.grad, rtol=1e-5, atol=8e-6 * q.grad.abs().max().item())  # lr0/8


def test_regularizer_with_grad_scaler_unscales_first():
    """Under GradScaler the regularizer's gradient must not be divided by the loss scale:
    step() unscales the optimizer's grads first (once), then scaler.step sees both terms."""
    def run(use_scaler):
        m = small_model()
        opt = torch.optim.SGD(sk.sorsa_parameters(m), lr=0.1)
        x, y = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 6)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        reg = sk.SORSARegularizer(m, 0.01, opt, scaler=scaler if use_scaler else None)
        loss = nn.functional.mse_loss(m(x), y)
        scaler.scale(loss).backward() if use_scaler else loss.backward()
        reg.step()
        grads = [p.grad.clone() for p in sk.sorsa_parameters(m) if p.grad is not None]
        scaler.step(opt) if use_scaler else opt.step()
        if use_scaler:
            scaler.update()
        return grads, [p.detach().clone() for p in sk.sorsa_parameters(m)]
    (g_amp, w_amp), (g_fp, w_fp) = run(True), run(False)
    for a, b in zip(g_amp, g_fp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(w_amp, w_fp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # already unscaled by the user (e.g. for clipping): not unscaled twice
    m = small_model()
    opt = torch.optim.SGD(sk.sorsa_parameters(m), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(nn.functional.mse_loss(m(torch.randn(4, 12)), torch.zeros(4, 6))).backward()
    scaler.unscale_(opt)
    sk.SORSARegularizer(m, 0.01, opt, scaler=scaler).step()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="before the optimizer step"):
        sk.SORSARegularizer(m, 0.01, opt, scaler=scaler).step()


def test_returns_device_tensor_without_sync():
    m = small_model()
    v = sk.SORSARegularizer(m, 0.01, 0.1).step()
    assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32


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
    assert float(cb.last_value) == pytest.approx(seen[-1], rel=1e-5)


def test_trainer_callback_unscales_accelerates_scaled_grads_first():
    """fp16 without clipping (max_grad_norm=0): at the pre-optimizer-step event accelerate's grads
    are still scaled; the callback unscales them (once) before adding the regularizer's gradient,
    which would otherwise be divided by the loss scale in scaler.step."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    def grads(use_scaler):
        m = small_model()
        inner = torch.optim.SGD(sk.sorsa_parameters(m), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        opt = SimpleNamespace(optimizer=inner, scaler=scaler if use_scaler else None)  # AcceleratedOptimizer's fields
        loss = nn.functional.mse_loss(m(torch.randn(8, 12, generator=torch.Generator().manual_seed(0))),
                                      torch.zeros(8, 6))
        scaler.scale(loss).backward()
        cb = sk.SORSACallback(0.01, lr="initial")
        cb.on_pre_optimizer_step(SimpleNamespace(learning_rate=0.1), None, None, model=m, optimizer=opt)
        return [p.grad.clone() for p in sk.sorsa_parameters(m)]
    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
