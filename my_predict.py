"""Show or measure the ResNetUNet trained by my_train.py, side by side with the book's FCN.

    python my_predict.py            # pictures/myout.png (image / ground truth / UNet) and pictures/compare.png
    python my_predict.py --eval     # full-resolution metrics of both models over the whole val split
    python my_predict.py --images photos/ --save-dir predictions --tta   # NAME.png (class indices), NAME_overlay.jpg
"""
from pathlib import Path

from some_define import (evaluate_checkpoint, finish_predict_args, metrics_table, open_model, predict_arg_parser,
                         predict_images, prediction_figure, read_checkpoint_split, run_main, save_figure,
                         try_all_gpus_or_cpu, write_json)


def main(argv: list[str] | None = None) -> None:
    p = predict_arg_parser(__doc__.splitlines()[0], "runs/my/last.pt", "pictures/myout.png")
    p.add_argument("--compare", default="runs/origin/last.pt", help="the FCN checkpoint to compare with")
    p.add_argument("--compare-figure", default="pictures/compare.png")
    args = p.parse_args(argv)
    device = try_all_gpus_or_cpu(args.device)
    net, checkpoint = open_model(args.checkpoint, device)
    args = finish_predict_args(args, checkpoint)
    if args.images:
        predict_images(net, checkpoint, args, device)
        return
    models = [(f"{checkpoint['model'].upper()}", net, checkpoint, Path(args.checkpoint))]
    if Path(args.compare).is_file():
        fcn, fcn_checkpoint = open_model(args.compare, device)
        if fcn_checkpoint["class_names"] == checkpoint["class_names"]:
            models.insert(0, (f"{fcn_checkpoint['model'].upper()}", fcn, fcn_checkpoint, Path(args.compare)))
        else:
            print(f"note: {args.compare} predicts other classes, so no comparison (pass --compare PATH)")
    else:
        print(f"note: no {args.compare}, so no comparison (train it with origin_train.py or pass --compare PATH)")
    images, labels, names = read_checkpoint_split(args, checkpoint)
    if args.eval:
        columns = {}
        for label, model, model_checkpoint, path in models:
            metrics = evaluate_checkpoint(model, model_checkpoint, images, labels, device, args.batch_size)
            out = args.metrics if args.metrics and model is net else path.with_name(f"metrics_{args.split}.json")
            write_json(metrics, out)
            print(f"{label}: wrote {out}")
            columns[f"{label} ({path.parent.name})"] = metrics
        print(metrics_table(columns, checkpoint["class_names"]))
        print(f"{len(images)} images of the {args.split} split")
        return
    n = args.num
    draw = lambda chosen: prediction_figure([(label, model) for label, model, *_ in chosen], images[:n], labels[:n],
                                            names[:n], checkpoint["colormap"], checkpoint["class_names"], device,
                                            args.batch_size)
    save_figure(draw(models[-1:]), args.figure)
    print(f"wrote {args.figure}")
    if len(models) == 2:
        save_figure(draw(models), args.compare_figure)
        print(f"wrote {args.compare_figure}")


if __name__ == "__main__":
    run_main(main)
