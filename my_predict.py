"""Show or measure the ResNetUNet trained by my_train.py, side by side with the book's FCN.

    python my_predict.py            # pictures/myout.png (image / ground truth / U-Net) and pictures/compare.png
    python my_predict.py --eval     # full-resolution metrics of both models over the whole val split
    python my_predict.py --images photos/ --save-dir predictions --tta   # NAME.png (class indices), NAME_overlay.jpg
    python my_predict.py --serve    # http://127.0.0.1:8000/: drop a photo, see the FCN and the U-Net side by side
"""
from support.cli import predict_arg_parser, predict_config
from support.errors import run_main
from support.prediction import run_prediction


def main(argv: list[str] | None = None) -> None:
    p = predict_arg_parser(__doc__.splitlines()[0], "runs/my/best.pt", "pictures/myout.png")
    p.add_argument("--compare", default="runs/origin/best.pt",
                   help="the FCN checkpoint to compare with (default: %(default)s)")
    p.add_argument("--compare-figure", default="pictures/compare.png",
                   help="the figure with both networks (default: %(default)s)")
    run_prediction(predict_config(vars(p.parse_args(argv))), network="unet")


if __name__ == "__main__":
    run_main(main)
