"""Scores for exports and sample folders: reconstruction (PSNR, SSIM, LPIPS), FID/KID, CLIP score, prompt
adherence on the embedded data. Weights come from local files only."""
