"""The built-in augmentation recipes, one YAML file each (`Recipe.load('deit')`), shipped inside the package."""
