"""SRDE's Python API: run a recipe, load a trained run, attach experts to a model you hold.

    import srde

    run_dir = srde.run("recipes/tiny.toml", overrides=["phases.experts.steps=50"])
    model, tokenizer = srde.load(run_dir)                 # HF model with the experts attached
    ids = tokenizer.encode("Q: 2+3=?\\nA:", bos=True, eos=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    with srde.experts_off(model):                         # the base model, same weights
        base = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)

    experts = srde.attach(my_hf_model, {"layout": {"name": "uniform", "num_experts": 4, "top_k": 1}})

The command line goes through these same functions. Importing this package stays cheap (torch is
imported when a function needs it).
"""

from srde_core import __version__
from srde_core.api import attach, experts_of, experts_off, generate, load, run

__all__ = ["__version__", "attach", "experts_of", "experts_off", "generate", "load", "run"]
