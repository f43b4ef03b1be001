"""Show or measure the ResNetUNet trained by my_train.py, side by side with the book's FCN.

    python my_predict.py            # pictures/myout.png (image / ground truth / UNet) and pictures/compare.png
    python my_predict.py --eval     # full-resolution metrics of both models over the whole val split
    python my_predict.py --images photos/ --save-dir predictions --tta   # NAME.png (class indices), NAME_overlay.jpg
"""
from pathlib import Path

from some_define import (inference_flags, metrics_table, open_for_prediction, open_model, predict_arg_parser,
                         predict_images, prediction_figure, read_checkpoint_split, run_main, save_figure,
                         write_metrics)


def main(argv: list[str] | None = None) -> None:
    p = predict_arg_parser(__doc__.splitlines()[0], "runs/my/last.pt", "pictures/myout.png")
    p.add_argument("--compare", default="runs/origin/last.pt", help="the FCN checkpoint to compare with")
    p.add_argument("--compare-figure", default="pictures/compare.png")
    device, net, checkpoint, args = open_for_prediction(p.parse_args(argv))
    if args.images:
        return predict_images(net, checkpoint, args, device)
    models = [(checkpoint["model"].upper(), net, checkpoint, Path(args.checkpoint))]
    if Path(args.compare).is_file():
        fcn, fcn_checkpoint = open_model(args.compare, device)
        if fcn_checkpoint["class_names"] == checkpoint["class_names"]:
            models.insert(0, (fcn_checkpoint["model"].upper(), fcn, fcn_checkpoint, Path(args.compare)))
        else:
            print(f"note: {args.compare} predicts other classes, so no comparison (pass --compare PATH)")
    else:
        print(f"note: no {args.compare}, so no comparison (train it with origin_train.py or pass --compare PATH)")
    images, labels, names = read_checkpoint_split(args, checkpoint)
    if args.eval:
        columns = {}
        for label, model, model_checkpoint, path in models:
            out = args.metrics if model is net else None   # --metrics names the main model's file
            metrics = write_metrics(model, model_checkpoint, path, images, labels, device, args, out)
            columns[f"{label} ({path.parent.name})"] = metrics
        print(metrics_table(columns, checkpoint["class_names"]))
        print(f"{len(images)} images of the {args.split} split")
        return
    n = args.num
    draw = lambda chosen: prediction_figure([(label, model) for label, model, *_ in chosen], images[:n], labels[:n],
                                            names[:n], checkpoint["colormap"], checkpoint["class_names"], device,
                                            args.batch_size, **inference_flags(args.amp, device))
    save_figure(draw(models[-1:]), args.figure)
    print(f"wrote {args.figure}")
    if len(models) == 2:
        save_figure(draw(models), args.compare_figure)
        print(f"wrote {args.compare_figure}")


if __name__ == "__main__":
    run_main(main)
