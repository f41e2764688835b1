"""The report half of the digits demo: results.json, REPORT.md and its figures from the finished runs."""
import json
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from digits_demo import (  # noqa: E402
    VARIANT_LABELS,
    VARIANTS,
    VIT_NAME,
    VIT_STUDENT_KWARGS,
    VIT_TEACHER_KWARGS,
    Job,
    display_command,
)
from timm.models import load_checkpoint  # noqa: E402

from shd_plugins.core.layer_mapping import resolve_layer_pairs  # noqa: E402
from shd_plugins.diffusers.sampling import load_dit_components  # noqa: E402
from shd_plugins.evaluation.top1 import build_eval_loader  # noqa: E402
from shd_plugins.viz import (  # noqa: E402
    collect_squeeze,
    markdown_table,
    mean_and_spread,
    plot_alpha_distributions,
    plot_squeeze,
    save_figure,
)

FID_KEYS = {'fid': 'frechet_inception_distance', 'kid': 'kernel_inception_distance_mean',
            'is': 'inception_score_mean', 'precision': 'precision', 'recall': 'recall'}


def _kwargs(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split('=') for item in text.split())}


def load_vit(run_dir: Path, kwargs: str) -> torch.nn.Module:
    model = timm.create_model(VIT_NAME, pretrained=False, num_classes=10, in_chans=1, img_size=32, **_kwargs(kwargs))
    load_checkpoint(model, str(run_dir / 'model_best.pth.tar'))
    return model.eval()


def collect_runs(jobs: list[Job], seconds: dict[str, float]) -> list[dict]:
    """One record per training run: what it was, its command, compute and evaluation numbers."""
    records = []
    evals = {job.name.rsplit('/', 1)[0]: job for job in jobs if 'eval' in job.info}
    for job in jobs:
        if 'eval' in job.info:
            continue
        record = {**job.info, 'name': job.name, 'command': display_command(job.command),
                  'train_seconds': round(seconds[job.name], 1)}
        eval_job = evals[job.name]
        record['eval_command'] = display_command(eval_job.command)
        record['eval_seconds'] = round(seconds[eval_job.name], 1)
        if job.info['kind'] == 'vit':
            top1 = json.loads((eval_job.run_dir / 'top1.json').read_text())
            record.update(top1=top1['top1'], top5=top1['top5'], val_loss=top1['loss'],
                          num_val=top1['num_samples'])
        else:
            fid = json.loads((eval_job.run_dir / 'fid_results.json').read_text())
            record.update({name: fid['metrics'].get(key) for name, key in FID_KEYS.items()})
            record['fid_tool'] = f"{fid.get('tool', 'torch-fidelity')} {fid.get('tool_version', '')}".strip()
            record['num_samples'] = fid.get('num_samples')
            record['samples_grid'] = str(eval_job.run_dir / 'samples_grid.png')
            record['samples_npz'] = str(eval_job.run_dir / 'samples.npz')
        records.append(record)
    return records


def summarize(records: list[dict], kind: str, metric: str) -> dict[str, dict[str, dict]]:
    """``{heads: {variant: mean/std/min/max/n of metric, plus mean train seconds}}`` for the students."""
    groups = defaultdict(list)
    for r in records:
        if r['kind'] == kind and r['role'] == 'student' and r.get(metric) is not None:
            groups[(r['heads'], r['variant'])].append(r)
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for (heads, variant), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]))):
        summary[str(heads)][variant] = {
            **mean_and_spread([r[metric] for r in runs]),
            'seeds': [r['seed'] for r in runs], 'values': [r[metric] for r in runs],
            'train_seconds_mean': float(np.mean([r['train_seconds'] for r in runs]))}
    return dict(summary)


COMPARISONS = (('kd_shd', 'kd'), ('kd_shd', 'kd_mean'), ('kd_shd', 'kd_select'))


def compare_variants(summary: dict[str, dict[str, dict]], higher_is_better: bool, metric: str) -> list[dict]:
    """KD + SHD against KD and against the two ablations, per head count, judged by the seed spread."""
    verdicts = []
    for heads, variants in summary.items():
        for variant, baseline in COMPARISONS:
            if variant not in variants or baseline not in variants:
                continue
            a, b = variants[variant], variants[baseline]
            gain = (a['mean'] - b['mean']) * (1 if higher_is_better else -1)
            spread = max(a['std'], b['std'])
            name, other = VARIANT_LABELS[variant], VARIANT_LABELS[baseline]
            if gain > 0 and (b['n'] < 2 or gain > 2 * spread):
                verdict = f'{name} beat {other}' + (' (one seed: no spread to judge by)' if b['n'] < 2 else
                                                     ' by more than twice the seed spread')
            elif gain > 0:
                verdict = f'{name} was better than {other} on average, but within twice the seed spread'
            else:
                verdict = f'{name} did not beat {other}'
            verdicts.append({'heads': int(heads), 'metric': metric, 'variant': variant, 'baseline': baseline,
                             'variant_mean': a['mean'], 'baseline_mean': b['mean'], 'gain': gain,
                             'seed_spread': spread, 'n_seeds': b['n'], 'verdict': verdict})
    return verdicts


def squeeze_figures(out: Path, figures: Path, heads: int, seed: int) -> dict[str, object]:
    """Figure 1 (one sample's teacher heads, squeezed maps, student maps) and Figure 3 (alpha distributions)."""
    data = out / 'data'
    teacher = load_vit(out / 'vit' / 'teacher', VIT_TEACHER_KWARGS)
    loader = build_eval_loader(data, teacher, split='val', batch_size=512, workers=0, in_chans=1)
    images, labels = next(iter(loader))
    result: dict[str, object] = {'alpha_stats': {}}
    alphas_for_plot = {}
    for h in sorted({heads, *VIT_STUDENT_KWARGS}):
        run = out / 'vit' / f'h{h}_kd_shd_s{seed}'
        if not (run / 'model_best.pth.tar').is_file():
            continue
        student = load_vit(run, VIT_STUDENT_KWARGS[h])
        pairs = resolve_layer_pairs('uniform', 4, 2)
        squeeze = collect_squeeze(teacher, student, {'x': images}, pairs)
        for (t, s), alphas in zip(squeeze['pairs'], squeeze['alphas']):
            name = f'ViT 8->{h} heads, teacher layer {t} -> student layer {s}'
            alphas_for_plot[name] = alphas.numpy()
            result['alpha_stats'][name] = mean_and_spread(alphas.numpy().ravel().tolist())
        if h == heads:
            t, s = squeeze['pairs'][-1]
            path = plot_squeeze(squeeze['teacher'][-1][0], squeeze['merged'][-1][0], squeeze['student'][-1][0],
                                squeeze['groups'][-1], figures / 'vit_squeeze.png', image=images[0, 0].numpy(),
                                title=f'ViT on digits (label {int(labels[0])}): teacher layer {t} (8 heads) -> '
                                      f'student layer {s} ({h} heads), KD + SHD student, patch tokens only')
            result['squeeze_figure'] = str(path)
    if alphas_for_plot:
        result['alpha_figure'] = str(plot_alpha_distributions(
            alphas_for_plot, figures / 'alpha_distributions.png',
            title=f'Closed-form merge weights over the {len(images)} validation images (0.5 = mean-merge)'))
    return result


def dit_squeeze_figure(out: Path, figures: Path, heads: int) -> str | None:
    """Figure 1 for the DiT: maps of one noisy digit at t = 500."""
    run = out / 'dit' / f'h{heads}_kd_shd'
    if not (run / 'transformer').is_dir():
        return None
    teacher = load_dit_components(out / 'dit' / 'teacher').transformer.eval()
    student = load_dit_components(run).transformer.eval()
    gen = torch.Generator().manual_seed(0)
    size = teacher.config.sample_size
    inputs = {'hidden_states': torch.randn(1, 1, size, size, generator=gen), 'timestep': torch.tensor([500]),
              'class_labels': torch.tensor([3])}
    pairs = resolve_layer_pairs('uniform', len(teacher.transformer_blocks), len(student.transformer_blocks))
    squeeze = collect_squeeze(teacher, student, inputs, pairs[-1:])
    t, s = squeeze['pairs'][0]
    return str(plot_squeeze(squeeze['teacher'][0][0], squeeze['merged'][0][0], squeeze['student'][0][0],
                            squeeze['groups'][0], figures / 'dit_squeeze.png',
                            title=f'DiT on digits (class 3, t = 500): teacher layer {t} (8 heads) -> student layer '
                                  f'{s} ({heads} heads), KD + SHD student'))


def sample_grid_figure(records: list[dict], figures: Path, per_class: int = 2) -> str | None:
    """Samples of every DiT, one row per model and ``per_class`` samples of each class, enlarged (nearest)."""
    runs = [r for r in records if r['kind'] == 'dit' and Path(r.get('samples_npz', '')).is_file()]
    if not runs:
        return None
    num_classes = 10
    fig, axes = plt.subplots(len(runs), 1, figsize=(0.5 * num_classes * per_class + 2.2, 0.62 * len(runs) + 0.4),
                             squeeze=False)
    for ax, r in zip(axes[:, 0], runs):
        samples = np.load(r['samples_npz'])['arr_0']  # class of sample i is i % num_classes ("even" labels)
        tiles = [samples[c + k * num_classes, ..., 0] for c in range(num_classes) for k in range(per_class)]
        ax.imshow(np.concatenate(tiles, axis=1), cmap='gray', interpolation='nearest', vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        label = 'teacher (8 heads)' if r['role'] == 'teacher' else f"{r['heads']} heads: {VARIANT_LABELS[r['variant']]}"
        ax.set_ylabel(f"{label}\nFID {r['fid']:.2f}", rotation=0, ha='right', va='center', fontsize=7)
    axes[0, 0].set_title(f'{per_class} samples per class, classes 0-9 left to right', fontsize=8)
    return str(save_figure(fig, figures / 'dit_samples.png', dpi=110))


def _fmt(stats: dict, digits: int = 2) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def render_markdown(results: dict, out: Path) -> str:
    rel = lambda p: str(Path(p).relative_to(out)) if p else ''  # noqa: E731
    s = results['settings']
    lines = [
        '# SHD on digits: the embedded default', '',
        f"Generated {results['generated']} by `python recipes/digits_demo.py{' --quick' if results['quick'] else ''}` "
        f"in {results['total_seconds'] / 60:.1f} min on {results['machine']}. Data: scikit-learn's digits as a "
        f"32x32 grayscale ImageFolder ({results['data']['counts']['train']} train / "
        f"{results['data']['counts']['val']} val images). Teachers have 8 heads; students {', '.join(map(str, s['heads']))}."
        + (' **Quick mode: tiny step counts, numbers are not meaningful.**' if results['quick'] else ''), '',
        '## Verdict', '']
    for v in results['verdicts']:
        unit = 'top-1 points' if v['metric'] == 'top1' else 'FID'
        lines.append(f"- {v['kind'].upper()}, {v['heads']} heads ({v['metric']}): {v['verdict']}: "
                     f"{v['variant_mean']:.2f} vs {v['baseline_mean']:.2f} (gain {v['gain']:+.2f} {unit}; largest "
                     f"seed std {v['seed_spread']:.2f}, {v['n_seeds']} seed(s)).")
    lines += ['', '## ViT students: top-1 on the validation split (eval/top1.py)', '']
    teacher = [r for r in results['runs'] if r['kind'] == 'vit' and r['role'] == 'teacher'][0]
    rows = [['teacher (8 heads)', '-', f"{teacher['top1']:.2f}", '-', f"{teacher['train_seconds']:.0f}"]]
    for heads, variants in results['vit_summary'].items():
        for variant, st in variants.items():
            rows.append([f'{heads} heads', VARIANT_LABELS[variant], _fmt(st), f"{st['min']:.2f} - {st['max']:.2f}",
                         f"{st['train_seconds_mean']:.0f}"])
    lines += [markdown_table(['model', 'variant', f"top-1 % (mean ± std over {len(s['vit_seeds'])} seed(s))",
                              'min - max', 'train s / run'], rows), '']
    lines += ["## DiT students: FID against the validation images with the digits classifier's features "
              '(eval/fid.py)', '',
              f"{s['fid_samples']} samples per model, DDIM {s['fid_steps']} steps, guidance 1.5; features: the ViT "
              f"teacher's pre-logits (torch-fidelity with a registered timm extractor; IS from its logits). Lower FID/KID "
              f"is better. One seed per DiT.", '']
    rows = []
    for r in [r for r in results['runs'] if r['kind'] == 'dit']:
        label = 'teacher (8 heads)' if r['role'] == 'teacher' else f"{r['heads']} heads"
        rows.append([label, '-' if r['role'] == 'teacher' else VARIANT_LABELS[r['variant']], f"{r['fid']:.3f}",
                     f"{r['kid']:.4f}" if r['kid'] is not None else '-', f"{r['is']:.2f}" if r['is'] else '-',
                     f"{r['train_seconds']:.0f}"])
    lines += [markdown_table(['model', 'variant', 'FID', 'KID', 'IS', 'train s'], rows), '']
    f = results['figures']
    lines += ['## What the squeeze does', '',
              'Teacher heads (top), the closed-form squeezed maps that supervise each student head (middle), and the '
              "KD + SHD student's maps (bottom), for one sample and the last distilled layer (as the paper's Figure 1).", '']
    for key in ('vit_squeeze', 'dit_squeeze'):
        if f.get(key):
            lines.append(f'![{key}]({rel(f[key])})')
    lines += ['', '## Where the merge weights land', '',
              "Distribution of the closed-form alpha per distilled layer (as the paper's Figure 3); 0.5 is what "
              'mean-merge uses, 1 is head-select.', '']
    if f.get('alpha_figure'):
        lines.append(f"![alphas]({rel(f['alpha_figure'])})")
    lines += ['', markdown_table(['layer', 'mean alpha', 'std', 'min', 'max'],
                                 [[k, f"{v['mean']:.3f}", f"{v['std']:.3f}", f"{v['min']:.3f}", f"{v['max']:.3f}"]
                                  for k, v in results['alpha_stats'].items()]), '',
              '## DiT samples', '']
    if f.get('dit_samples'):
        lines.append(f"![samples]({rel(f['dit_samples'])})")
    lines += ['', '## Commands', '', 'Each run is the recipe or evaluator a user runs at scale, with the same flags '
              "(paths are this machine's):", '', '```']
    for r in results['runs']:
        lines += [r['command'], r['eval_command']]
    lines += ['```', '', 'All numbers are in `results.json`.']
    return '\n'.join(lines) + '\n'


def write_report(out: Path, jobs: list[Job], seconds: dict[str, float], settings, *, quick: bool,
                 total_seconds: float) -> Path:
    import platform
    figures = out / 'figures'
    figures.mkdir(parents=True, exist_ok=True)
    records = collect_runs(jobs, seconds)
    vit_summary = summarize(records, 'vit', 'top1')
    dit_summary = summarize(records, 'dit', 'fid')
    verdicts = ([{'kind': 'vit', **v} for v in compare_variants(vit_summary, True, 'top1')]
                + [{'kind': 'dit', **v} for v in compare_variants(dit_summary, False, 'fid')])
    squeeze = squeeze_figures(out, figures, min(settings.heads), settings.vit_seeds[0])
    figure_paths = {'vit_squeeze': squeeze.get('squeeze_figure'), 'alpha_figure': squeeze.get('alpha_figure'),
                    'dit_squeeze': dit_squeeze_figure(out, figures, min(settings.heads)),
                    'dit_samples': sample_grid_figure(records, figures)}
    data_meta = json.loads((out / 'data' / 'digits_meta.json').read_text())
    results = {
        'generated': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'quick': quick,
        'machine': f'{platform.machine()}, {__import__("os").cpu_count()} CPU cores, torch {torch.__version__}',
        'total_seconds': round(total_seconds, 1), 'settings': asdict(settings),
        'data': {'root': str(out / 'data'), 'counts': data_meta['counts']},
        'runs': records, 'vit_summary': vit_summary, 'dit_summary': dit_summary, 'verdicts': verdicts,
        'alpha_stats': squeeze['alpha_stats'], 'figures': figure_paths,
    }
    (out / 'results.json').write_text(json.dumps(results, indent=2))
    report = out / 'REPORT.md'
    report.write_text(render_markdown(results, out))
    return report
