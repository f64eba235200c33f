"""The long tail at this scale: fine-tune a LoRA on the shifted split with one class cut to a few images,
then measure how often that class is generated before and after `optimize_noise`, for the oracle's
class probability and for the class word's attention concentration (`dit_lens.experiments.long_tail`).

    python studies/long_tail.py [--quick] [--label esophagitis] [--count 3] [--guidance-scales 4.5 1]
        [--objectives class_probability attention_concentration] [--seeds 64] [--out DIR]

Seed 003 (second abstract) optimises the initial noise so that long-tailed classes are generated
reliably; no figure is published.
"""

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from dit_lens.storage import cache_root
from dit_lens.experiments.long_tail import OBJECTIVES, LongTailConfig, run_long_tail

QUICK = dict(steps=40, seeds=4, per_class=4, count=1, guidance_scales=(1.0,), iterations=2)


def parse(argv=None) -> tuple[LongTailConfig, Path]:
    p = argparse.ArgumentParser(prog="long_tail", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="the small version (under a minute on one CPU thread)")
    p.add_argument("--out", default=None, help="result folder (default: studies/long_tail-<hash> in the cache, $DIT_LENS_CACHE or the checkout's cache/)")
    for f in dataclasses.fields(LongTailConfig):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, tuple):
            kind = float if f.name == "guidance_scales" else str
            p.add_argument(flag, nargs="+", type=kind, default=None, metavar=f.name.upper()[:-1],
                           choices=OBJECTIVES if f.name == "objectives" else None,
                           help=f"(default: {' '.join(map(str, default))})")
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"(default: {default})")
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for f in dataclasses.fields(LongTailConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(given, list) else given
    try:
        cfg = LongTailConfig(**values)
    except ValueError as err:
        p.error(str(err))
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return cfg, Path(args.out) if args.out else cache_root() / "studies" / f"long_tail-{digest}"


def report(result: dict) -> None:
    f = lambda e: f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"
    label = result["settings"]["label"]
    print(f"'{label}' read by the oracle, {result['prompt']!r}, seeds {result['seeds'][0]}-{result['seeds'][1]}:")
    for c in result["cells"]:
        print(f"  guidance {c['guidance_scale']:g}, {c['objective']}: shipped {f(c['shipped'])}; adapter "
              f"{f(c['before'])} -> {f(c['after'])} (change {f(c['change'])}, n {c['n']}); {c['moved']} seeds moved, "
              f"cosine >= {c['cosine_min']:.4f}, norm ratio {c['norm_ratio_range'][0]:.4f}-{c['norm_ratio_range'][1]:.4f}, "
              f"KS p >= {c['ks_pvalue_min']:.3f}; {c['optimise_seconds']:.0f} s")


def main(argv=None) -> int:
    cfg, out = parse(argv)
    print(f"long_tail: results in {out}")
    report(run_long_tail(cfg, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
