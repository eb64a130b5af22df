"""Smoke-scale overrides for end-to-end training tests: tiny nets, tens of samples, 2 Ray Train workers."""

DATA = [
    "data.embedded_train_per_class=16", "data.embedded_val_per_class=4", "shard.samples_per_shard=40",
]
NETS = [
    "model.encoder_channels=[16,32]", "model.decoder_channels=[16,32]", "model.prior_width=64",
    "model.prior_depth=2", "model.decoder_width=64", "model.decoder_depth=1", "model.base_widths=[64,64]",
    "model.base_depths=[2,2]",
]
TRAIN = [
    "ray.num_workers=2", "ray.num_cpus=2", "ray.cpus_per_worker=1",
    "stage1.batch_size=16", "stage1.total_samples=64", "stage1.warmup_samples=16", "stage1.log_every_samples=16",
    "stage1.ckpt_every_samples=32", "stage1.eval_batch=8", "stage1.eval_steps=2",
    "stage2.batch_size=16", "stage2.total_samples=64", "stage2.warmup_samples=16", "stage2.log_every_samples=16",
    "stage2.ckpt_every_samples=32", "stage2.eval_batch=8", "stage2.eval_steps=2", "encode.batch_size=32",
    "eval.num_samples=16", "eval.batch_size=16", "eval.base_steps=2", "eval.decoder_steps=2", "eval.grid_size=16",
    "eval.reference_samples=32",
]
SMOKE = DATA + NETS + TRAIN
