"""Bag commands: make-bag, eval-bag (deterministic offline evaluation), replay (lockstep)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from usn_perception.cli.registry import READOUT_CHOICES, command, floats, pair, progress, size
from usn_perception.errors import UsnPerceptionError

#: Exit status of a run that wrote partial outputs (a damaged bag); 1 is "nothing written".
EXIT_PARTIAL = 2


def _command_line() -> str:
    return 'usn-perception ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])


# ------------------------------------------------------------------------------- make-bag
def _cfg_make_bag(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', type=Path, metavar='DIR', help='a folder of images (name order)')
    src.add_argument('--coco', type=Path, metavar='FILE',
                     help='a COCO keypoints file (its images, in file order, with labels)')
    src.add_argument('--visp', nargs='?', const='mire-2', metavar='SEQUENCE',
                     help='a ViSP sequence from the cache (default mire-2; fetched if missing)')
    src.add_argument('--synthetic', type=int, metavar='N',
                     help='N frames of one rendered target pose under a scripted lighting '
                          'change (known θ(t))')
    p.add_argument('--out', required=True, type=Path, help='bag folder to create (must not exist)')
    p.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap')
    p.add_argument('--topic', default=None,
                   help='image topic (default /camera/image_raw, or …/compressed)')
    p.add_argument('--frame-id', default='camera')
    p.add_argument('--rate', type=float, default=30.0, help='frames per second (stamps)')
    p.add_argument('--start-stamp', type=float, default=1_700_000_000.0,
                   help='header stamp of the first frame, seconds (never 0)')
    p.add_argument('--encoding', choices=('mono8', 'mono16', 'rgb8', 'bgr8'), default='mono8',
                   help='sensor_msgs/Image encoding')
    p.add_argument('--compressed', choices=('png', 'jpeg'), default=None,
                   help='record sensor_msgs/CompressedImage in this format instead')
    p.add_argument('--labels', type=Path, default=None,
                   help='with --images/--visp: COCO labels matched to frames by file name')
    p.add_argument('--pseudo-label', action='store_true',
                   help='with --images/--visp: label frames with the classical detector')
    p.add_argument('--visp-cache', type=Path, default=None, help='ViSP cache folder')
    p.add_argument('--size', type=size, default=(160, 120), help='synthetic frame size W,H')
    p.add_argument('--seed', type=int, default=0, help='synthetic pose seed')
    p.add_argument('--lighting', choices=('sine', 'step', 'ramp', 'none'), default='sine',
                   help='synthetic θ(t) pattern')
    p.add_argument('--amp-alpha', type=float, default=0.3, help='synthetic contrast amplitude')
    p.add_argument('--amp-beta', type=float, default=0.1, help='synthetic brightness amplitude')
    p.add_argument('--background', default='coffee', help='synthetic background photo')


@command('make-bag', 'record an image bag (mcap or sqlite3) with a stamp-keyed label sidecar',
         'usn-perception make-bag --visp mire-2 --pseudo-label --out bags/mire2', _cfg_make_bag)
def cmd_make_bag(args: argparse.Namespace) -> int:
    """Write sensor_msgs/Image (or CompressedImage) frames at --rate from one source.

    Labels, when the source has them, go to BAG/labels.json: COCO keypoints whose images carry
    stamp_ns, the header stamp of their frame (eval-bag --labels reads it).
    """
    from usn_perception.bag import sources
    from usn_perception.bag.write import BagSpec, write_image_bag

    if (args.labels or args.pseudo_label) and not (args.images or args.visp):
        raise UsnPerceptionError('--labels/--pseudo-label apply to --images and --visp only')
    topic = args.topic or ('/camera/image_raw/compressed' if args.compressed
                           else '/camera/image_raw')
    try:
        spec = BagSpec(topic=topic, frame_id=args.frame_id, rate=args.rate,
                       start_ns=round(args.start_stamp * 1e9), encoding=args.encoding,
                       compression=args.compressed, storage=args.storage)
        if args.images:
            src = sources.folder_source(args.images, args.labels, args.pseudo_label)
        elif args.coco:
            src = sources.coco_source(args.coco)
        elif args.visp:
            src = sources.visp_source(args.visp, args.visp_cache, args.labels, args.pseudo_label)
        else:
            src = sources.synthetic_source(args.synthetic, args.size, args.seed, args.lighting,
                                           args.amp_alpha, args.amp_beta, args.background)
    except ValueError as e:
        if isinstance(e, UsnPerceptionError):
            raise
        raise UsnPerceptionError(str(e)) from e
    done = write_image_bag(args.out, src.frames, spec, keypoint_names=src.keypoint_names,
                           info={**src.info, 'command': _command_line()},
                           progress=progress(args), total=src.count)
    print(f'{done["frames"]} frames ({done["msgtype"]}) on {done["topic"]} -> {done["bag"]} '
          f'({done["storage"]})')
    if done['labels']:
        print(f'labels for {done["labelled"]} frames -> {done["labels"]}')
    return 0


# ------------------------------------------------------------------- shared pipeline options
def _pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('per-frame pipeline (defaults = the node\'s, without its clock '
                             'budget)')
    g.add_argument('--interval', choices=('measured', 'fixed'), default='measured',
                   help='θ box: measured from the recent frames, or the fixed box')
    g.add_argument('--alpha', type=pair, default=(0.8, 1.2), help='fixed contrast box LO,HI')
    g.add_argument('--beta', type=pair, default=(-0.1, 0.1), help='fixed brightness box LO,HI')
    g.add_argument('--margin-alpha', type=float, default=0.02)
    g.add_argument('--margin-beta', type=float, default=0.02)
    g.add_argument('--window-s', type=float, default=1.0, help='measurement look-back (s)')
    g.add_argument('--max-subboxes', type=int, default=5,
                   help='θ sub-boxes bounded per frame (node default 5)')
    g.add_argument('--method', choices=('forward', 'ibp'), default='forward')
    g.add_argument('--readout', choices=READOUT_CHOICES, default=None)
    g.add_argument('--score-threshold', type=float, default=0.0)
    g.add_argument('--max-width-px', type=float, default=None)
    g.add_argument('--no-certify', action='store_true', help='predict only (status SKIPPED)')
    g.add_argument('--budget-ms', type=float, default=None,
                   help='wall-clock certification limit per frame (makes results depend on '
                        'machine load: not deterministic)')
    w = p.add_argument_group('frames')
    w.add_argument('--start', type=float, default=None, help='seconds after the first message')
    w.add_argument('--end', type=float, default=None, help='seconds after the first message')
    w.add_argument('--limit', type=int, default=None, help='at most N frames')


def _settings(args: argparse.Namespace):
    from usn_perception.interval import IntervalSettings
    from usn_perception.pipeline import PipelineSettings

    try:
        return PipelineSettings(
            readout=args.readout, certify=not args.no_certify, method=args.method,
            max_subboxes=args.max_subboxes, budget_ms=args.budget_ms,
            max_width_px=args.max_width_px, score_threshold=args.score_threshold,
            interval=IntervalSettings(mode=args.interval, fixed_alpha=args.alpha,
                                      fixed_beta=args.beta, margin_alpha=args.margin_alpha,
                                      margin_beta=args.margin_beta, window_s=args.window_s))
    except ValueError as e:
        raise UsnPerceptionError(f'invalid pipeline option: {e}') from e


def _window(args: argparse.Namespace) -> dict:
    return {'start': args.start, 'end': args.end, 'limit': args.limit}


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------- eval-bag
def _cfg_eval_bag(p: argparse.ArgumentParser) -> None:
    p.add_argument('bag', type=Path, help='rosbag2 folder, .mcap or .db3 file')
    p.add_argument('--topic', required=True, help='Image or CompressedImage topic')
    p.add_argument('--out', required=True, type=Path, help='report folder')
    p.add_argument('--labels', type=Path, default=None,
                   help='stamp-keyed COCO labels (make-bag writes BAG/labels.json)')
    p.add_argument('--model', type=Path, default=None, help='model (default: shipped default)')
    p.add_argument('--tolerance', type=floats, default=(2.0, 3.0, 5.0),
                   help='τ in pixels for PCK and certified accuracy')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1, as the node; 0 = torch default)')
    p.add_argument('--ns', default='/usn_perception',
                   help='namespace of the output topics in keypoints.mcap (the node\'s name)')
    p.add_argument('--no-plots', action='store_true')
    _pipeline_args(p)


@command('eval-bag', 'evaluate an image topic of a bag offline, every frame exactly once',
         'usn-perception eval-bag bags/mire2 --topic /camera/image_raw '
         '--labels bags/mire2/labels.json --out reports/mire2', _cfg_eval_bag)
def cmd_eval_bag(args: argparse.Namespace) -> int:
    """Run the node's per-frame core on every frame and write the report folder.

    Files: frames.csv, timings.csv, summary.json, report.md, plots and keypoints.mcap (the
    node's output topics at the input stamps). frames.csv and keypoints.mcap are
    byte-identical for the same bag and options. A bag that breaks part way gets outputs for
    the frames read, marked partial, and exit status 2.
    """
    from usn_perception.bag.evaluate import PartialEvaluationError, evaluate_bag
    from usn_perception.bag.write import LABELS_FILE
    from usn_perception.detector import load_detector

    settings = _settings(args)
    _threads(args.threads)
    detector = load_detector(args.model)
    if args.labels is None and (args.bag / LABELS_FILE).is_file():
        print(f'note: {args.bag / LABELS_FILE} exists; pass --labels to score against it',
              file=sys.stderr)
    try:
        ev = evaluate_bag(args.bag, args.out, topic=args.topic, detector=detector,
                          settings=settings, labels=args.labels, tolerances=args.tolerance,
                          ns=args.ns, progress=progress(args), plots=not args.no_plots,
                          command=_command_line(), **_window(args))
    except PartialEvaluationError as e:
        print(f'usn-perception eval-bag: error: {e}', file=sys.stderr)
        return EXIT_PARTIAL
    s = ev.summary
    print(f'{s["frames"]} frames, certified fraction {s["certified_fraction"]:.3f}, '
          f'{s["throughput_fps"]:.2f} frames/s -> {args.out / "report.md"}')
    return 0


# --------------------------------------------------------------------------------- replay
def _cfg_replay(p: argparse.ArgumentParser) -> None:
    p.add_argument('bag', type=Path, help='rosbag2 folder, .mcap or .db3 file')
    p.add_argument('--topic', required=True, help='Image or CompressedImage topic of the bag')
    p.add_argument('--out', required=True, type=Path,
                   help='folder for keypoints.mcap (the node\'s outputs) and summary.json')
    p.add_argument('--node', default='/usn_perception',
                   help='fully qualified name of the node (its ~/ topics)')
    p.add_argument('--to', default=None,
                   help='topic the node listens on (default: the bag topic)')
    p.add_argument('--spawn', action='store_true',
                   help='start usn_perception_node for the replay (use_sim_time, reliable '
                        'input, the pipeline options below) and stop it afterwards')
    p.add_argument('--model', type=Path, default=None, help='with --spawn: model to load')
    p.add_argument('--compare-offline', action='store_true',
                   help='also run eval-bag with the node\'s settings into OUT/offline and '
                        'compare frame by frame (OUT/comparison.json; exit 3 on a mismatch)')
    p.add_argument('--timeout', type=float, default=60.0,
                   help='seconds to wait for one frame\'s outputs')
    p.add_argument('--connect-timeout', type=float, default=60.0,
                   help='seconds to wait for the node to appear')
    _pipeline_args(p)


@command('replay', 'replay a bag through usn_perception_node in lockstep and record its outputs',
         'usn-perception replay bags/mire2 --topic /camera/image_raw --spawn --compare-offline '
         '--out reports/mire2_replay', _cfg_replay)
def cmd_replay(args: argparse.Namespace) -> int:
    """Publish /clock and each frame, wait for the node's outputs, then send the next.

    Without --spawn the node must already run (with use_sim_time:=true, listening on the
    topic); source env.sh first: the replay talks over loopback DDS only.
    """
    from usn_perception.bag import replay
    from usn_perception.bag.evaluate import PartialEvaluationError
    from usn_perception.bag.read import BagReader
    from usn_perception.reports import write_json

    proc = None
    alive = None
    log = None
    with BagReader(args.bag) as reader:
        msgtype = reader.image_topic(args.topic).msgtype
    target, remap = replay.input_topics(args.to or args.topic, msgtype)
    if args.spawn:
        import tempfile

        params = replay.node_parameters(_settings(args), args.model)
        log = Path(tempfile.mkstemp(prefix='usn_replay_node_', suffix='.log')[1])
        proc = replay.spawn_node(params, remap, target, args.node.strip('/').split('/')[-1],
                                 log)
        alive = replay.check_alive(proc, log)
    try:
        try:
            res = replay.replay_bag(
                args.bag, args.out, topic=args.topic, ns=args.node, publish_topic=target,
                timeout_s=args.timeout, connect_timeout_s=args.connect_timeout,
                progress=progress(args), alive=alive, command=_command_line(),
                **_window(args))
        finally:
            if proc is not None:
                replay.stop_node(proc)
                (args.out / 'node.log').parent.mkdir(parents=True, exist_ok=True)
                log.replace(args.out / 'node.log')
    except PartialEvaluationError as e:
        print(f'usn-perception replay: error: {e}', file=sys.stderr)
        return EXIT_PARTIAL
    s = res.summary
    print(f'{s["frames_sent"]} frames sent, outputs for {s["outputs_recorded"]}, '
          f'{len(s["missing"])} missing, {s["frames_per_s"]:.2f} frames/s -> '
          f'{args.out / "keypoints.mcap"}')
    if args.compare_offline:
        _threads(1)
        cmp = replay.offline_check(args.bag, args.out, args.topic, res.info, _window(args),
                                   progress(args))
        write_json(args.out / 'comparison.json', cmp)
        print(f'offline vs replay: {cmp["identical"]}/{cmp["frames_expected"]} frames '
              f'identical, {len(cmp["missing"])} missing, {len(cmp["differences"])} differ')
        if not cmp['equal']:
            return 3
    return 0 if res.complete else 1
