"""lily_ext inside the usual tooling: transformers.Trainer (LilyTrainer) and torch.amp.autocast."""

import copy

import pytest
import torch
from helpers.models import tiny_bert, token_batch

import lily_ext
from lily_ext import LilyConfig, get_lily_model


class TopicData(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 97, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] % 3).tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[i],
            "unused_column": "dropped by the Trainer",
        }


def test_lily_trainer_trains_saves_and_resumes(tmp_path):
    from transformers import TrainingArguments

    base = tiny_bert()
    config = LilyConfig(
        r=4, num_B=3, target_modules=["query", "value"], modules_to_save=["classifier"], routing="sequence"
    )
    model = get_lily_model(copy.deepcopy(base), config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        save_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = lily_ext.LilyTrainer(model=model, args=args, train_dataset=TopicData())
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    trainer.save_model()
    assert (tmp_path / "checkpoint-2" / "lily_adapter" / "adapter.safetensors").is_file()
    ids = token_batch()
    loaded = lily_ext.load_adapter(copy.deepcopy(base), tmp_path / "lily_adapter")
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)
    # resume: a fresh model picks up the step-4 checkpoint's weights and optimizer
    again = get_lily_model(copy.deepcopy(base), config)
    resumed = lily_ext.LilyTrainer(
        model=again, args=TrainingArguments(**{**args.to_dict(), "max_steps": 5}), train_dataset=TopicData()
    )
    assert resumed.train(resume_from_checkpoint=True).global_step == 5
    with pytest.raises(TypeError, match="LilyTrainer trains a lily_ext.LilyModel"):
        lily_ext.LilyTrainer(model=base, args=args)


@pytest.mark.parametrize("routing", ["batch", "sequence", "token", "static"])
def test_bf16_autocast_on_cpu(routing):
    model = get_lily_model(
        tiny_bert(), LilyConfig(r=4, num_B=3, target_modules=["query", "value"], routing=routing, init_weights=False)
    )
    ids = token_batch()
    reference = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
