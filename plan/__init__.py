"""The run planner: what one REPA-E step costs on a GPU, counted on a CPU (docs/PLANNING.md).

    python -m repae.plan --config configs/sitxl_repae.json --gpu h100 --gpus 8
"""
