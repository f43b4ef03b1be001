"""Show or measure the book's FCN trained by origin_train.py.

    python origin_predict.py               # pictures/origin_out.png: image / ground truth / prediction for 4 val images
    python origin_predict.py --eval        # full-resolution metrics over the whole val split, as JSON and a table
"""
from pathlib import Path

from some_define import (checkpoint_dataset_dir, evaluate_checkpoint, metrics_table, open_model, predict_arg_parser,
                         prediction_figure, read_voc_images, run_main, save_figure, try_all_gpus_or_cpu, write_json)


def main(argv: list[str] | None = None) -> None:
    args = predict_arg_parser(__doc__.splitlines()[0], "runs/origin/last.pt", "pictures/origin_out.png").parse_args(argv)
    device = try_all_gpus_or_cpu(args.device)
    net, checkpoint = open_model(args.checkpoint, device)
    images, labels, names = read_voc_images(checkpoint_dataset_dir(args, checkpoint), args.split,
                                            num_classes=checkpoint["num_classes"])
    if args.eval:
        metrics = evaluate_checkpoint(net, checkpoint, images, labels, device, args.batch_size)
        path = args.metrics or Path(args.checkpoint).with_name(f"metrics_{args.split}.json")
        write_json(metrics, path)
        print(metrics_table({checkpoint["model"]: metrics}, checkpoint["class_names"]))
        print(f"{metrics['num_images']} images; wrote {path}")
        return
    n = args.num
    fig = prediction_figure([(checkpoint["model"].upper(), net)], images[:n], labels[:n], names[:n],
                            checkpoint["colormap"], checkpoint["class_names"], device, args.batch_size)
    save_figure(fig, args.figure)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    run_main(main)
