"""The launch argv is a pure function: check it for one GPU, many GPUs, many machines, DeepSpeed."""

from cl_release.release.train import TrainResult, launch_argv, merge_argv, parse_log_line, toolchain_versions


def test_single_process():
    argv = launch_argv("outputs/v1.0.0/axolotl.yml", {"num_processes": 1, "num_machines": 1}, python="py")
    assert argv == ["py", "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "axolotl.cli.train", "outputs/v1.0.0/axolotl.yml"]


def test_multi_gpu_and_machines():
    argv = launch_argv("c.yml", {"num_processes": 8, "num_machines": 2, "machine_rank": 1,
                                 "main_process_ip": "10.0.0.1", "main_process_port": 29500},
                       mixed_precision="bf16", python="py")
    joined = " ".join(argv)
    assert "--num_processes 8 --num_machines 2 --mixed_precision bf16" in joined
    assert "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500" in joined
    assert "--multi_gpu" in argv and argv[-3:] == ["-m", "axolotl.cli.train", "c.yml"]


def test_deepspeed_is_left_to_the_axolotl_config():
    argv = launch_argv("c.yml", {"num_processes": 4, "num_machines": 1, "deepspeed": "ds/zero2.json"}, python="py")
    assert "--multi_gpu" not in argv and "ds/zero2.json" not in argv


def test_merge_argv():
    assert merge_argv("c.yml", "outputs/v1/adapter", "outputs/.staging/m", python="py") == [
        "py", "-m", "axolotl.cli.merge_lora", "c.yml", "--lora_model_dir=outputs/v1/adapter",
        "--output_dir=outputs/.staging/m"]


def test_parse_trainer_lines():
    r = TrainResult(duration_seconds=0)
    assert parse_log_line(" 50%|#####     | 18/36 [00:00<00:00, 19.82it/s]", r) == (18, 36)
    parse_log_line("{'loss': '6.3', 'grad_norm': '1.1', 'tokens/trainable': 666, 'epoch': '1.5'}", r)
    parse_log_line("{'train_runtime': '2.068', 'train_loss': '6.355', 'epoch': '3'}", r)
    assert (r.final_loss, r.train_loss, r.tokens_trained, r.steps) == (6.3, 6.355, 666, 36)
    parse_log_line("{'loss': __import__('os').system('x')}", r)  # never evaluated
    assert r.final_loss == 6.3


def test_toolchain_versions_are_read_without_imports():
    versions = toolchain_versions()
    assert versions["cl_release"] == __import__("cl_release").__version__
    assert {"axolotl", "torch", "transformers", "peft"} <= versions.keys()
