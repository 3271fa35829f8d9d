"""Progress bars that a stop (Ctrl-C, SIGTERM) arriving while one is being made cannot leave half-built."""

from tqdm import tqdm


class Progress(tqdm):
    """tqdm's bar, whose finaliser has nothing to trip on when its construction is cut short."""

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            # tqdm sets `disable` before `pos`, and its finaliser closes the bar by `pos`: a stop landing between the
            # two printed "Exception ignored in tqdm.__del__ ... AttributeError: 'tqdm' object has no attribute
            # 'pos'" (with its traceback) under the command's own message that it stopped
            self.disable = True
            raise
