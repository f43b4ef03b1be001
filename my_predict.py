"""Show or measure the ResNetUNet trained by my_train.py, side by side with the book's FCN.

    python my_predict.py            # pictures/myout.png (image / ground truth / UNet) and pictures/compare.png
    python my_predict.py --eval     # full-resolution metrics of both models over the whole val split
    python my_predict.py --images photos/ --save-dir predictions --tta   # NAME.png (class indices), NAME_overlay.jpg
"""
from support.cli import predict_arg_parser, run_main
from support.prediction import run_prediction


def main(argv: list[str] | None = None) -> None:
    p = predict_arg_parser(__doc__.splitlines()[0], "runs/my/last.pt", "pictures/myout.png")
    p.add_argument("--compare", default="runs/origin/last.pt", help="the FCN checkpoint to compare with")
    p.add_argument("--compare-figure", default="pictures/compare.png")
    args = p.parse_args(argv)
    run_prediction(args, args.compare, args.compare_figure)


if __name__ == "__main__":
    run_main(main)
