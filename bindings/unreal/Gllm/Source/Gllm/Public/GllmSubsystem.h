// Owns one gllm::Client per game instance: connects on start, keeps the lease on the client's own I/O thread
// (through level loads and hitches), drains its events on the game thread every frame within a budget, and
// reports every frame's time from the engine's delta time (gllm::Client::report_frame: four reports a second,
// each with the smoothed frame time, the longest frame, the frame count and the frames over 1.1 x TargetFrameMs),
// which lets the server's frame governor yield compute while the game's frames run over.
#pragma once

#include "CoreMinimal.h"
#include "Subsystems/GameInstanceSubsystem.h"
#include "Tickable.h"

THIRD_PARTY_INCLUDES_START
#include "gllm/client.h"
THIRD_PARTY_INCLUDES_END

#include <memory>

#include "GllmSubsystem.generated.h"

DECLARE_DYNAMIC_MULTICAST_DELEGATE_OneParam(FGllmConnectionChanged, bool, bConnected);

UCLASS(Config = Game)
class GLLM_API UGllmSubsystem : public UGameInstanceSubsystem, public FTickableGameObject
{
	GENERATED_BODY()

public:
	/** The gllm server (`gllm serve` binds tcp://127.0.0.1:5555 by default). DefaultGame.ini: [/Script/Gllm.GllmSubsystem] */
	UPROPERTY(Config, EditAnywhere, BlueprintReadOnly, Category = "gllm")
	FString Host = TEXT("127.0.0.1");

	UPROPERTY(Config, EditAnywhere, BlueprintReadOnly, Category = "gllm")
	int32 Port = 5555;

	/** The server's shared secret, when it was started with --token. */
	UPROPERTY(Config, EditAnywhere, Category = "gllm")
	FString Token;

	/** Time the game thread may spend dispatching events each frame. */
	UPROPERTY(Config, EditAnywhere, BlueprintReadWrite, Category = "gllm")
	float PollBudgetMs = 1.0f;

	/** The frame time the game aims for, sent with each frame report (16.6 for 60 fps; 0: 60 fps). A frame longer than
	 *  1.1 x this counts as over: when more than 0.5 % of the frames are over, the server computes less. */
	UPROPERTY(Config, EditAnywhere, BlueprintReadWrite, Category = "gllm")
	float TargetFrameMs = 16.6f;

	UPROPERTY(BlueprintAssignable, Category = "gllm")
	FGllmConnectionChanged OnConnectionChanged;

	UFUNCTION(BlueprintPure, Category = "gllm")
	bool IsConnected() const { return Client && Client->is_connected(); }

	/** Prefills a shared system prompt (persona and lore) into the server's prefix cache. */
	UFUNCTION(BlueprintCallable, Category = "gllm")
	void Warmup(const FString& SystemPrompt);

	gllm::Client* GetClient() const { return Client.get(); }

	// UGameInstanceSubsystem
	virtual void Initialize(FSubsystemCollectionBase& Collection) override;
	virtual void Deinitialize() override;

	// FTickableGameObject
	virtual void Tick(float DeltaTime) override;
	virtual TStatId GetStatId() const override;
	virtual bool IsTickable() const override { return Client != nullptr; }
	virtual bool IsTickableInEditor() const override { return false; }
	virtual bool IsTickableWhenPaused() const override { return true; }   // keep draining while paused

	static std::string ToUtf8(const FString& S);
	static FString FromUtf8(const std::string& S);

private:
	std::unique_ptr<gllm::Client> Client;
};
