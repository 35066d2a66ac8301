#!/usr/bin/env python3
"""Runs the four Python snippets of the original LatentSync API guide (its sections
"1. 提交唇形同步任务", "2. 查询任务状态", "3. 获取处理结果", "4. 查看队列状态") against a
running gateway, unchanged apart from:

- the server address (`http://localhost:8000` -> `--base`),
- the example input URLs (-> `--video-url` / `--audio-url`),
- the placeholder `task_id = "你的任务ID"` (-> the id snippet 1 printed, as a user would).

The snippets run in one namespace, in order, exactly as a user pastes them.

`--until queued`: the pipeline stages may not exist yet, so snippet 2 would poll forever;
after the first poll `time.sleep` raises, snippet 3 is skipped (the task is not completed),
and snippet 4 runs. `--until completed` runs snippet 2 to its end and snippet 3 downloads
into `--workdir`. `--poll-scale` shortens the snippets' `time.sleep(5)` for tests.

Exit status 0 when every snippet ran; prints `TASK_ID=<id>` and `FINAL_STATUS=<status>`.
"""

import argparse
import os
import sys
import time

SNIPPET_1_SUBMIT = r'''
import requests

# 提交任务
response = requests.post(
    "http://localhost:8000/sync",
    json={
        "video_url": "https://example.com/video.mp4",  # 要处理的视频URL
        "audio_url": "https://example.com/audio.wav",  # 用于唇形同步的音频URL
        # 可选参数
        # "inference_ckpt_path": "checkpoints/unet.ckpt",
        # "inference_steps": 20,
        # "guidance_scale": 1.0
    }
)

# 获取任务ID和队列位置
task_id = response.json()["task_id"]
queue_position = response.json()["queue_position"]
print(f"任务ID: {task_id}, 队列位置: {queue_position + 1}")
'''

SNIPPET_2_POLL = r'''
import requests
import time

task_id = "你的任务ID"

# 轮询任务状态直到完成
while True:
    response = requests.get(f"http://localhost:8000/task/{task_id}")
    data = response.json()
    
    status = data["status"]
    progress = data["progress"] * 100
    message = data["message"]
    
    print(f"状态: {status}, 进度: {progress:.1f}%, 消息: {message}")
    
    # 如果任务完成或失败，退出循环
    if status in ["completed", "failed"]:
        break
    
    # 等待5秒后再次查询
    time.sleep(5)
'''

SNIPPET_3_DOWNLOAD = r'''
# 检查任务是否完成
if data["status"] == "completed":
    # 获取视频URL
    video_url = f"http://localhost:8000{data['output_video_url']}"
    mask_url = f"http://localhost:8000{data['output_mask_url']}" if data['output_mask_url'] else None
    
    # 下载处理后的视频
    response = requests.get(video_url)
    with open("result_video.mp4", "wb") as f:
        f.write(response.content)
    
    print("视频已下载到 result_video.mp4")
    
    # 如果有掩码视频，也下载下来
    if mask_url:
        response = requests.get(mask_url)
        with open("result_mask.mp4", "wb") as f:
            f.write(response.content)
        print("掩码视频已下载到 result_mask.mp4")
'''

SNIPPET_4_QUEUE = r'''
# 查询当前队列状态
response = requests.get("http://localhost:8000/queue")
queue_data = response.json()

print(f"队列长度: {queue_data['queue_length']}")
print(f"是否有任务处理中: {queue_data['is_processing']}")

# 显示队列中的任务
if queue_data['queued_tasks']:
    print("等待中的任务:")
    for task in queue_data['queued_tasks']:
        print(f"  任务ID: {task['task_id']}, 位置: {task['position'] + 1}")
'''


class StopPolling(Exception):
    """Raised by the patched sleep in `--until queued` mode."""


def adapt(code, args, task_id=None):
    code = code.replace("http://localhost:8000", args.base.rstrip("/"))
    code = code.replace("https://example.com/video.mp4", args.video_url)
    code = code.replace("https://example.com/audio.wav", args.audio_url)
    if task_id is not None:
        code = code.replace('task_id = "你的任务ID"', f'task_id = "{task_id}"')
    return code


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="http://localhost:8000")
    p.add_argument("--video-url", default="https://example.com/video.mp4")
    p.add_argument("--audio-url", default="https://example.com/audio.wav")
    p.add_argument("--until", choices=["queued", "completed"], default="completed")
    p.add_argument("--workdir", default=".")
    p.add_argument("--poll-scale", type=float, default=1.0)
    args = p.parse_args()
    os.chdir(args.workdir)

    real_sleep = time.sleep

    def sleep(seconds):
        if args.until == "queued":
            raise StopPolling()
        real_sleep(seconds * args.poll_scale)

    time.sleep = sleep
    ns = {"__name__": "__seed__"}
    exec(adapt(SNIPPET_1_SUBMIT, args), ns)
    task_id = ns["task_id"]
    print(f"TASK_ID={task_id}", flush=True)
    try:
        exec(adapt(SNIPPET_2_POLL, args, task_id), ns)
    except StopPolling:
        pass
    exec(adapt(SNIPPET_3_DOWNLOAD, args), ns)
    exec(adapt(SNIPPET_4_QUEUE, args), ns)
    print(f"FINAL_STATUS={ns['data']['status']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
