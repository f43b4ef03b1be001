"""Show or measure the book's FCN trained by origin_train.py.

    python origin_predict.py               # pictures/origin_out.png: image / ground truth / prediction for 4 val images
    python origin_predict.py --eval        # full-resolution metrics over the whole val split, as JSON and a table
"""
from pathlib import Path

from some_define import (checkpoint_dataset_dir, evaluate_checkpoint, label2image, metrics_table, open_model,
                         predict_arg_parser, predict_full_res, read_voc_images, run_main, save_figure, show_images,
                         try_all_gpus_or_cpu, write_json)


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
    images, labels, names = images[:args.num], labels[:args.num], names[:args.num]
    preds = dict(predict_full_res(net, images, device, args.batch_size))
    colormap = checkpoint["colormap"]
    rows = [[x.permute(1, 2, 0) for x in images],
            [label2image(y, colormap) for y in labels],
            [label2image(preds[i], colormap) for i in range(len(images))]]
    save_figure(show_images(rows, ["image", "ground truth", checkpoint["model"]], titles=[names, [], []]), args.figure)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    run_main(main)
