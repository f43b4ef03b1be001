"""Show or measure the book's FCN trained by origin_train.py.

    python origin_predict.py               # pictures/origin_out.png: image / ground truth / prediction for 4 val images
    python origin_predict.py --eval        # full-resolution metrics over the whole val split, as JSON and a table
    python origin_predict.py --images photos/ --save-dir predictions   # NAME.png (class indices), NAME_overlay.jpg
"""
from some_define import (inference_flags, metrics_table, open_for_prediction, predict_arg_parser, predict_images,
                         prediction_figure, read_checkpoint_split, run_main, save_figure, write_metrics)


def main(argv: list[str] | None = None) -> None:
    args = predict_arg_parser(__doc__.splitlines()[0], "runs/origin/last.pt", "pictures/origin_out.png").parse_args(argv)
    device, net, checkpoint, args = open_for_prediction(args)
    if args.images:
        return predict_images(net, checkpoint, args, device)
    images, labels, names = read_checkpoint_split(args, checkpoint)
    if args.eval:
        metrics = write_metrics(net, checkpoint, args.checkpoint, images, labels, device, args, args.metrics)
        print(metrics_table({checkpoint["model"]: metrics}, checkpoint["class_names"]))
        print(f"{metrics['num_images']} images of the {args.split} split")
        return
    n = args.num
    fig = prediction_figure([(checkpoint["model"].upper(), net)], images[:n], labels[:n], names[:n],
                            checkpoint["colormap"], checkpoint["class_names"], device, args.batch_size,
                            **inference_flags(args.amp, device))
    save_figure(fig, args.figure)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    run_main(main)
